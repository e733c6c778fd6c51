"""The same multiple-choice task through the in-process engine and through `qwen15 serve` (echo + logprobs).

    python benchmarks/eval_engine_vs_serve.py --task mmlu --limit 50

Starts `qwen15 serve` on the model, runs the task on identical documents through both backends, prints both
accuracies and exits non-zero when they differ by more than --tolerance points (1 by default).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import urllib.request


def wait_for(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"qwen15 serve exited with status {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=2)
            return
        except OSError:
            time.sleep(1)
    sys.exit(f"qwen15 serve did not answer at {url} within {timeout_s:.0f}s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="mmlu")
    ap.add_argument("--model", default=None)
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--port", type=int, default=18431)
    ap.add_argument("--tolerance", type=float, default=1.0, help="allowed difference in accuracy points")
    args = ap.parse_args()

    from qwen15 import LLM
    from qwen15.eval.backends import EndpointBackend, EngineBackend
    from qwen15.eval.runner import run_task
    from qwen15.eval.tasks import get_task

    out = tempfile.mkdtemp(prefix="qwen15-eval-vs-serve-")
    llm = LLM.load(args.model)
    engine = run_task(get_task(args.task), EngineBackend(llm), limit=args.limit, seed=args.seed, out_dir=out)
    del llm
    cmd = [sys.executable, "-m", "qwen15.cli", "serve", "--port", str(args.port)]
    if args.model:
        cmd += ["--model", args.model]
    server = subprocess.Popen(cmd)
    try:
        url = f"http://127.0.0.1:{args.port}"
        wait_for(url, server)
        served = run_task(get_task(args.task), EndpointBackend(url), limit=args.limit, seed=args.seed, out_dir=out)
    finally:
        server.terminate()
        server.wait(30)
    metric = engine["headline"]
    a, b = 100 * engine["metrics"][metric]["mean"], 100 * served["metrics"][metric]["mean"]
    print(f"{args.task} {metric} on {engine['n']} documents: engine {a:.2f}, qwen15 serve {b:.2f}, "
          f"difference {abs(a - b):.2f} points (logs in {out})")
    return 0 if abs(a - b) <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
