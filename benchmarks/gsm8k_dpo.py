"""Does DPO learn a preference? Pairs from GSM8K (chosen: the reference solution; rejected: a wrong answer the
0.5B itself sampled), LoRA DPO for one epoch, then the reward accuracy on held-out pairs built the same way.

    .venv/bin/python benchmarks/gsm8k_dpo.py pairs [--train 600 --heldout 100]   # sample with `qwen15 serve`
    .venv/bin/python benchmarks/gsm8k_dpo.py train [--threads 2]                 # qwen15 train dpo, resumable
    .venv/bin/python benchmarks/gsm8k_dpo.py report                              # results/gsm8k_dpo/README.md

Train pairs come from GSM8K's train split, held-out pairs from its test split (problems in a seeded order).
The 0.5B answers each question as chat (temperature 0.8, up to 400 tokens, 3 tries); a finished answer whose
last number is not the gold one becomes the rejected side, the reference solution (calculator annotations
removed, ending in `#### N`) the chosen one. Problems the model solved every time give no pair. Sampling
appends to its JSONL as it goes and skips problems already tried, so a stopped run continues; the reward
accuracy is `eval_rewards/accuracy` that `qwen15 train dpo --eval-data` logs at the end of training.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

from eval_engine_vs_serve import wait_for  # the same start-up wait (this folder is on sys.path for a script)
from serve_load import free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT.parent / "shared" / "data" / "gsm8k"
WORK = HERE / ".work" / "gsm8k_dpo"  # pairs, attempts, checkpoints and the adapter (not committed)
RESULTS = HERE / "results" / "gsm8k_dpo"
MODEL = "qwen2.5-coder-0.5b-instruct"
CALC = re.compile(r"<<[^>]*>>")
TRIES = 3


def problems(split: str, seed: int) -> list[dict]:
    rows = [json.loads(x) for x in (DATA / f"{split}.jsonl").read_text().splitlines() if x.strip()]
    random.Random(seed).shuffle(rows)
    return rows


async def _sample_split(client, split: str, want: int, seed: int, concurrency: int) -> None:
    from qwen15.eval.scoring import gsm8k_extract, gsm8k_gold

    out, tried_log = WORK / f"{split}_pairs.jsonl", WORK / f"{split}_tried.jsonl"
    tried = {json.loads(x)["question"] for x in tried_log.read_text().splitlines()} if tried_log.exists() else set()
    have = len(out.read_text().splitlines()) if out.exists() else 0
    todo = [p for p in problems(split, seed) if p["question"] not in tried]
    sem, lock = asyncio.Semaphore(concurrency), asyncio.Lock()
    t0 = time.time()

    async def one(p: dict) -> None:
        nonlocal have
        async with sem:
            if have >= want:
                return
            gold, wrong = gsm8k_gold(p["answer"]), None
            for attempt in range(TRIES):
                r = await client.post("/v1/chat/completions", json={
                    "model": "m", "messages": [{"role": "user", "content": p["question"]}],
                    "temperature": 0.8, "max_tokens": 400, "seed": attempt})
                choice = r.json()["choices"][0]
                text, got = choice["message"]["content"], gsm8k_extract(choice["message"]["content"])["flexible"]
                if choice["finish_reason"] == "stop" and got is not None and got != gold:  # a finished, wrong answer
                    wrong = text
                    break
            async with lock:
                with open(tried_log, "a") as f:
                    f.write(json.dumps({"question": p["question"], "pair": wrong is not None}) + "\n")
                if wrong is not None and have < want:
                    with open(out, "a") as f:
                        f.write(json.dumps({"prompt": [{"role": "user", "content": p["question"]}],
                                            "chosen": [{"role": "assistant", "content": CALC.sub("", p["answer"])}],
                                            "rejected": [{"role": "assistant", "content": wrong}]}) + "\n")
                    have += 1
                    print(f"[gsm8k_dpo] {split}: {have}/{want} pairs ({time.time() - t0:,.0f} s)", flush=True)

    await asyncio.gather(*(one(p) for p in todo))


def pairs(n_train: int, n_heldout: int, seed: int, concurrency: int) -> None:
    import httpx

    WORK.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen([sys.executable, "-m", "qwen15.cli", "serve", "--model", MODEL, "--port", str(port),
                               "--served-model-name", "m", "--max-batch", str(concurrency), "--log-level", "warning"],
                              env=env)
    try:
        wait_for(f"http://127.0.0.1:{port}", server)

        async def run() -> None:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=httpx.Timeout(900)) as client:
                await _sample_split(client, "train", n_train, seed, concurrency)
                await _sample_split(client, "test", n_heldout, seed, concurrency)

        asyncio.run(run())
    finally:
        server.terminate()
        server.wait(timeout=60)


def train(threads: int) -> None:
    out = WORK / "adapter"
    cmd = [sys.executable, "-m", "qwen15.cli", "train", "dpo", "--model", MODEL,
           "--data", str(WORK / "train_pairs.jsonl"), "--eval-data", str(WORK / "test_pairs.jsonl"),
           "--out", str(out), "--lora", "--epochs", "1", "--beta", "0.1", "--lr", "5e-5", "--warmup", "0.1",
           "--batch-tokens", "2048", "--grad-accum", "2", "--max-seq-len", "1024", "--save-every", "5",
           "--seed", "1234", "--threads", str(threads), "--no-progress"]
    if any(out.glob("checkpoint-*")):
        cmd += ["--resume", str(out)]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    with open(WORK / "train_wall.jsonl", "a") as f:
        f.write(json.dumps({"wall_s": time.time() - t0, "resumed": "--resume" in cmd}) + "\n")


def report() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = ["# GSM8K DPO of the 0.5B (qwen2.5-coder-0.5b-instruct Q4_K_M, LoRA r16, beta 0.1, one epoch)", ""]
    for split in ("train", "test"):
        f = WORK / f"{split}_pairs.jsonl"
        lines.append(f"- {split} pairs: {len(f.read_text().splitlines()) if f.exists() else 0}")
    metrics = WORK / "adapter" / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        final = [r for r in rows if "eval_rewards/accuracy" in r]
        if final:
            lines.append(f"- held-out reward accuracy: {final[-1]['eval_rewards/accuracy']:.3f} (target >= 0.7); "
                         f"margin {final[-1].get('eval_rewards/margin', float('nan')):.3f}")
        lines.append(f"- steps: {rows[-1].get('step')}; last train loss {rows[-1].get('loss', float('nan')):.4f}")
        for png in (WORK / "adapter").glob("*.png"):
            (RESULTS / png.name).write_bytes(png.read_bytes())
    wall = WORK / "train_wall.jsonl"
    if wall.is_file():
        lines.append(f"- training wall time: {sum(json.loads(x)['wall_s'] for x in wall.read_text().splitlines()):,.0f} s")
    (RESULTS / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["pairs", "train", "report"])
    ap.add_argument("--train", type=int, default=600, help="training pairs")
    ap.add_argument("--heldout", type=int, default=100, help="held-out pairs (from the test split)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.step == "pairs":
        pairs(a.train, a.heldout, a.seed, a.concurrency)
    elif a.step == "train":
        train(a.threads)
    else:
        report()


if __name__ == "__main__":
    main()
