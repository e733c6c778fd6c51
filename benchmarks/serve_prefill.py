"""Prefill speed of `qwen15 serve`: prompt tokens per second for one long prompt and for concurrent prompts.

    python benchmarks/serve_prefill.py --rounds 3                 # this checkout's server
    python benchmarks/serve_prefill.py --src /tmp/old/src         # another checkout's, for a before/after

Each request asks for max_tokens 1 (the time is the prompt's); prompts are random words, different from
the first token on, so the prefix cache does not help. Prints the median over --rounds of each case.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there one all we can their has been if more when will would who so no time river "
         "mountain engine kernel batch token cache block prefix server client stream model layer").split()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--src", default=str(ROOT / "src"), help="the qwen15 source tree to serve from")
    ap.add_argument("--quant", default="gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--long-words", type=int, default=400)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--client-words", type=int, default=100)
    args = ap.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": args.src}
    server = subprocess.Popen([sys.executable, "-m", "qwen15.cli", "serve", "--model", args.model, "--port", str(port),
                               "--quant", args.quant, "--threads", str(args.threads), "--served-model-name", "m"],
                              env=env)
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(0)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)

        def ask(words: int) -> int:
            prompt = " ".join(rng.choice(WORDS) for _ in range(words))
            r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 1,
                                                          "temperature": 0}, timeout=600)
            r.raise_for_status()
            return r.json()["usage"]["prompt_tokens"]

        ask(32)  # warm-up
        cases = {"one prompt": [], f"{args.clients} prompts at once": []}
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            n = ask(args.long_words)
            cases["one prompt"].append(n / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
                n = sum(pool.map(ask, [args.client_words] * args.clients))
            cases[f"{args.clients} prompts at once"].append(n / (time.perf_counter() - t0))
        for name, rates in cases.items():
            print(f"{name}: {statistics.median(rates):.1f} prompt tok/s (rounds: {', '.join(f'{r:.1f}' for r in rates)})")
    finally:
        server.terminate()
        server.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
