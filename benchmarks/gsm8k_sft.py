"""Does fine-tuning help? LoRA SFT of the 0.5B on GSM8K's train split, then GSM8K test with and without it.

    .venv/bin/python benchmarks/gsm8k_sft.py prepare [--n 1000]     # chat JSONL from ../shared/data/gsm8k
    .venv/bin/python benchmarks/gsm8k_sft.py train [--threads 2]    # qwen15 train sft, resumable
    .venv/bin/python benchmarks/gsm8k_sft.py eval                   # qwen15 eval run ... with and without --lora, side by side
    .venv/bin/python benchmarks/gsm8k_sft.py report                 # results/gsm8k_sft.md

Every step resumes where it stopped (training from its latest checkpoint, evaluation from its per-sample
log), so the whole run can span sessions on a 2-core machine. The training examples are the first --n of
the train split in a seeded shuffle, as chat (question -> worked answer ending in `#### N`); GSM8K's
calculator annotations (`<<48/2=24>>`) are removed, since no model sees them at test time. 50 further
train problems are the held-out loss. The test is `qwen15 eval run --task gsm8k --limit 200 --seed 1234`
(8-shot chain of thought, greedy), the same settings with the adapter and without it.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
WORK = HERE / ".work" / "gsm8k_sft"  # data, checkpoints and the adapter (not committed)
RESULTS = HERE / "results" / "gsm8k_sft"
MODEL = "qwen2.5-coder-0.5b-instruct"
EVAL = ["--task", "gsm8k", "--limit", "200", "--seed", "1234", "--no-progress"]
CALC = re.compile(r"<<[^>]*>>")


def qwen15() -> list[str]:
    return [sys.executable, "-m", "qwen15.cli"]


def chat(row: dict) -> dict:
    return {"messages": [{"role": "user", "content": row["question"]},
                         {"role": "assistant", "content": CALC.sub("", row["answer"])}]}


def prepare(n: int, seed: int) -> None:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    WORK.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.jsonl", rows[:n]), ("heldout.jsonl", rows[n:n + 50])):
        (WORK / name).write_text("".join(json.dumps(chat(r)) + "\n" for r in part))
    print(f"[gsm8k_sft] {n} training and 50 held-out problems from {DATA} (seed {seed}) -> {WORK}")


def train(threads: int) -> None:
    out = WORK / "adapter"
    cmd = [*qwen15(), "train", "sft", "--model", MODEL, "--data", str(WORK / "train.jsonl"),
           "--eval-data", str(WORK / "heldout.jsonl"), "--out", str(out), "--lora", "--epochs", "1",
           "--lr", "2e-4", "--warmup", "0.05", "--packing", "--batch-tokens", "1024", "--grad-accum", "2",
           "--max-seq-len", "1024", "--save-every", "5", "--seed", "1234", "--threads", str(threads), "--no-progress"]
    if any(out.glob("checkpoint-*")):
        cmd += ["--resume", str(out)]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    with open(WORK / "train_wall.jsonl", "a") as f:  # one line per (resumed) part of the run
        f.write(json.dumps({"wall_s": time.time() - t0, "resumed": "--resume" in cmd}) + "\n")


def evaluate(threads: int) -> None:
    """Base and adapter side by side, each on `threads` threads (default 1): on 2 cores two one-thread
    decodes finish sooner than two two-thread ones in a row (one decode gains ~1.3x from a second thread)."""
    runs = WORK / "eval"
    procs = [subprocess.Popen([*qwen15(), "eval", "run", *EVAL, "--threads", str(threads), "--model", MODEL,
                              "--out", str(runs), "--name", name, *extra], cwd=ROOT)
             for name, extra in (("base", []), ("lora", ["--lora", str(WORK / "adapter")]))]
    if any(p.wait() for p in procs):
        raise SystemExit("an evaluation failed (see above); `eval` again resumes it")


def report() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = ["# GSM8K LoRA SFT of the 0.5B (qwen2.5-coder-0.5b-instruct Q4_K_M)", ""]
    metrics = WORK / "adapter" / "metrics.jsonl"
    if metrics.is_file():
        steps = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        evals = [x["eval_loss"] for x in steps if "eval_loss" in x]
        times = sorted(x["step_s"] for x in steps if "step_s" in x)
        lines.append(f"Training: {len(steps)} steps (LoRA r16 on all 7 projections, 1 epoch, packed); train loss "
                     f"{steps[0].get('loss', float('nan')):.3f} at step 1, {steps[-1].get('loss', float('nan')):.3f} "
                     f"at the last" + (f"; held-out loss {evals[-1]:.3f}" if evals else "") + ".")
        if times:
            median = times[len(times) // 2]
            lines.append(f"Step times: median {median:.1f} s, i.e. ~{len(times) * median / 60:.0f} min for the run "
                         f"alone; sum {sum(times):,.0f} s (which includes time the run was paused or shared the machine).")
        for png in (WORK / "adapter").glob("*.png"):
            (RESULTS / png.name).write_bytes(png.read_bytes())
    wall = WORK / "train_wall.jsonl"
    if wall.is_file():
        lines.append(f"Wall time of the parts that ran to their end: "
                     f"{sum(json.loads(x)['wall_s'] for x in wall.read_text().splitlines()):,.0f} s")
    scores = {}
    for summary in sorted((WORK / "eval").glob("result-*.json")):
        r = json.loads(summary.read_text())
        scores[r["model"]] = r
    if scores:
        lines += ["", "`qwen15 eval run --task gsm8k --limit 200 --seed 1234` (8-shot chain of thought, greedy), "
                  "with `--lora` and without:", "",
                  "| model | problems | flexible | strict |", "|---|---|---|---|"]
        for name, r in scores.items():
            m = r["metrics"]
            lines.append(f"| {name} | {r['n']} | {100 * m['flexible']['mean']:.1f} | {100 * m['strict']['mean']:.1f} |")
        if {"base", "lora"} <= scores.keys():
            gain = 100 * (scores["lora"]["metrics"]["flexible"]["mean"] - scores["base"]["metrics"]["flexible"]["mean"])
            lines += ["", f"Adapter gain, flexible: {gain:+.1f} points (target >= +5)."]
    (RESULTS / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["prepare", "train", "eval", "report"])
    ap.add_argument("--n", type=int, default=1000, help="training problems")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2, help="training threads")
    ap.add_argument("--eval-threads", type=int, default=1, help="threads of each of the two evaluations")
    a = ap.parse_args()
    if a.step == "prepare":
        prepare(a.n, a.seed)
    elif a.step == "train":
        train(a.threads)
    elif a.step == "eval":
        evaluate(a.eval_threads)
    else:
        report()


if __name__ == "__main__":
    main()
