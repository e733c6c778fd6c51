"""`qwen15 eval run`: one task on one backend, with a results cache, resume, per-sample logs and repeats.

A run's key hashes what decides its scores: the model fingerprint, task, prompt-template hash, shots,
generation parameters, seed and the chosen documents. Its samples go to <out>/<task>-<key>.jsonl, one line
per document, appended and flushed as each finishes: a crashed run resumes where it stopped, and a finished
one is a cache hit (its metrics are recomputed from the log, no model call). Each line holds the prompt, the
output, the extracted answer and the verdict, so every score can be traced back to its prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path

from ..errors import EvalError
from .backends import Backend, GenParams
from .scoring import mean_std
from .tasks.base import Task


def default_out_dir() -> Path:
    from ..weights.packaged import cache_dir

    return cache_dir() / "eval-runs"


def select_docs(docs: list[dict], limit: int | None, seed: int) -> list[dict]:
    """All documents, or a seeded random subset of `limit` (the same subset for every model and repeat)."""
    if limit is None or limit >= len(docs):
        return docs
    if limit < 1:
        raise EvalError(f"--limit must be >= 1, got {limit}")
    picked = set(random.Random(seed).sample(range(len(docs)), limit))
    return [d for i, d in enumerate(docs) if i in picked]  # dataset order: neighbours share few-shot prefixes


def run_key(backend: Backend, task: Task, gen: GenParams, ids: list[str]) -> str:
    ident = {"model": backend.fingerprint, "task": task.name, "template": task.template_hash(), "shots": task.shots,
             "gen": gen.as_dict(), "docs": hashlib.sha256("\n".join(ids).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _read_log(path: Path) -> dict[str, dict]:
    """Finished samples by id; a torn last line (a crash mid-write) is ignored and redone."""
    done = {}
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                done[str(rec["id"])] = rec
    return done


def _drop_torn_tail(path: Path) -> None:
    """Cut a partial last line (a kill mid-write) so that appended records start on a line of their own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def run_once(task: Task, backend: Backend, docs: list[dict], gen: GenParams, out_dir: Path, *,
             model_name: str = "", progress: bool = True) -> dict:
    """One pass over docs (resuming from the log); the summary, also written to <task>-<key>.json."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    ids = [str(d["id"]) for d in docs]
    key = run_key(backend, task, gen, ids)
    log_path = out_dir / f"{task.name}-{key}.jsonl"
    _drop_torn_tail(log_path)
    done = _read_log(log_path)
    todo = [d for d in docs if str(d["id"]) not in done]
    start = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log, tqdm(total=len(docs), initial=len(docs) - len(todo),
                                                            desc=f"{task.name}", disable=not progress) as bar:
        for doc in todo:
            rec = {"id": str(doc["id"]), **task.run_one(backend, doc, gen)}
            rec["correct"] = bool(rec["correct"])
            done[rec["id"]] = rec
            log.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
            log.flush()
            os.fsync(log.fileno())
            bar.update(1)
            bar.set_postfix({task.metric: f"{task.aggregate(list(done.values()))[task.metric]:.3f}"})
    records = [done[i] for i in ids]
    summary = {"task": task.name, "model": model_name or backend.fingerprint, "fingerprint": backend.fingerprint,
               "template_hash": task.template_hash(), "shots": task.shots, "gen_params": gen.as_dict(),
               "seed": gen.seed, "n": len(records), "metrics": task.aggregate(records), "key": key,
               "samples_file": str(log_path), "cached": not todo, "elapsed_s": round(time.perf_counter() - start, 2)}
    (out_dir / f"{task.name}-{key}.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_task(task: Task, backend: Backend, *, limit: int | None = None, seed: int = 1234, repeats: int = 1,
             out_dir: str | Path | None = None, model_name: str = "", progress: bool = True,
             gen: GenParams | None = None, docs: list[dict] | None = None) -> dict:
    """repeats passes with seeds seed, seed+1, ...; the metrics as mean and std over passes."""
    if repeats < 1:
        raise EvalError(f"--repeats must be >= 1, got {repeats}")
    out_dir = Path(out_dir) if out_dir else default_out_dir()
    docs = select_docs(task.docs() if docs is None else docs, limit, seed)
    base = gen or task.gen_params()
    runs = []
    for r in range(repeats):
        params = GenParams(**{**base.as_dict(), "seed": seed + r})
        runs.append(run_once(task, backend, docs, params, out_dir, model_name=model_name, progress=progress))
    metrics = {}
    for name in runs[0]["metrics"]:
        mean, std = mean_std([run["metrics"][name] for run in runs])
        metrics[name] = {"mean": mean, "std": std}
    result = {"task": task.name, "model": runs[0]["model"], "fingerprint": backend.fingerprint,
              "template_hash": task.template_hash(), "shots": task.shots, "n": len(docs), "repeats": repeats,
              "seed": seed, "metrics": metrics, "headline": task.metric, "runs": [r["key"] for r in runs],
              "samples_files": [r["samples_file"] for r in runs]}
    key = hashlib.sha256("".join(result["runs"]).encode()).hexdigest()[:16]
    (out_dir / f"result-{task.name}-{key}.json").write_text(json.dumps(result, indent=2))
    return result
