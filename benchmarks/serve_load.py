"""Load test of `qwen15 serve`: concurrency scaling, a random-length run with disconnects, prefix caching.

Starts the server as a subprocess on a free port, drives it with async streaming HTTP clients, and writes
a markdown table to benchmarks/results/serve_load.md (plus the raw numbers as JSON beside it).

    .venv/bin/python benchmarks/serve_load.py                      # the issue's full counts (slow on CPU)
    .venv/bin/python benchmarks/serve_load.py --requests 100 --gen-tokens 32   # reduced

Measured:
  1. one streaming client, then 16 at once (same prompt length and max_tokens, eos ignored): aggregate
     decode tok/s (generated tokens / wall time of the phase) and its ratio; p50/p99 time to first token;
  2. --requests bounded requests with random prompt and output lengths, --concurrency at a time, 10% of
     clients hanging up mid-stream: 5xx count, KV blocks still in use afterwards (from /metrics), server
     RSS after warm-up and at the end;
  3. a long shared-prefix conversation: time to first token of the second turn over the first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there one all we can their has been if more when will would who so no time river "
         "mountain engine kernel batch token cache block prefix server client stream model layer").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def text_of(words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


async def stream_one(client: httpx.AsyncClient, prompt: str, max_tokens: int, *, hang_up_after: int | None = None,
                     model: str = "bench") -> dict:
    """One streaming completion: status, TTFT, token count, first/last token times."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    out = {"status": None, "ttft": None, "tokens": 0, "t0": t0, "first": None, "last": None, "hung_up": False,
           "times": []}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            await r.aread()
            return out
        events = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                out["tokens"] = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["text"]:
                now = time.perf_counter()
                if out["first"] is None:
                    out["first"], out["ttft"] = now, now - t0
                out["last"] = now
                out["times"].append(now)
                events += 1
                if hang_up_after is not None and events >= hang_up_after:
                    out["hung_up"] = True
                    return out  # leaving the block closes the connection mid-stream
    return out


async def metric(client: httpx.AsyncClient, name: str) -> float:
    text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


async def concurrency_phase(client, clients: int, prompt_words: int, gen_tokens: int, seed: int) -> dict:
    rng = random.Random(seed)
    prompts = [text_of(prompt_words, rng) for _ in range(clients)]
    t0 = time.perf_counter()
    results = await asyncio.gather(*(stream_one(client, p, gen_tokens) for p in prompts))
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    # Decode rate: tokens after each client's first, over the span from the first first-token to the last token.
    span = max(r["last"] for r in results) - min(r["first"] for r in results)
    # Steady state: from the moment every client has its first token to the moment the first one ends,
    # all are decoding and none is prefilling: the tokens streamed in that window over its length.
    start, end = max(r["first"] for r in results), min(r["last"] for r in results)
    steady = sum(start < t <= end for r in results for t in r["times"]) / (end - start) if end > start else float("nan")
    for r in results:
        del r["times"]
    return {"clients": clients, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "decode_tok_s": sum(r["tokens"] - 1 for r in results) / span if span > 0 else float("nan"),
            "steady_decode_tok_s": steady,
            "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
            "errors": sum(r["status"] != 200 for r in results)}


async def random_phase(client, pid: int, requests: int, concurrency: int, max_prompt_words: int,
                       max_gen: int, seed: int) -> dict:
    rng = random.Random(seed)
    jobs = []
    for i in range(requests):
        hang = rng.randint(1, max(1, max_gen // 2)) if rng.random() < 0.10 else None
        jobs.append((text_of(rng.randint(5, max_prompt_words), rng), rng.randint(1, max_gen), hang))
    sem = asyncio.Semaphore(concurrency)
    statuses: list[int] = []
    rss = {}
    done = 0

    async def run(job):
        nonlocal done
        async with sem:
            try:
                r = await stream_one(client, job[0], job[1], hang_up_after=job[2])
                statuses.append(r["status"])
            except httpx.HTTPError as e:
                statuses.append(-1)
                print(f"client error: {e!r}", file=sys.stderr)
            done += 1
            if done == max(1, requests // 10):
                rss["warm"] = rss_mb(pid)

    t0 = time.perf_counter()
    await asyncio.gather(*(run(j) for j in jobs))
    wall = time.perf_counter() - t0
    # Aborts are freed at the engine's next step: give it a moment to go idle.
    for _ in range(100):
        if await metric(client, "qwen15_running_sequences") == 0 and await metric(client, "qwen15_queue_depth") == 0:
            break
        await asyncio.sleep(0.1)
    return {"requests": requests, "concurrency": concurrency, "wall_s": wall,
            "hung_up": sum(1 for j in jobs if j[2] is not None),
            "status_5xx": sum(1 for s in statuses if s >= 500), "client_errors": sum(1 for s in statuses if s < 0),
            "status_other": sum(1 for s in statuses if 0 <= s < 500 and s != 200),
            "kv_blocks_used_after": await metric(client, "qwen15_kv_blocks_used"),
            "rss_warm_mb": rss.get("warm", float("nan")), "rss_end_mb": rss_mb(pid)}


async def prefix_phase(client, prefix_words: int, seed: int) -> dict:
    rng = random.Random(seed)
    system = "You are a helpful assistant. Background notes: " + text_of(prefix_words, rng)
    turn1 = [{"role": "system", "content": system}, {"role": "user", "content": "Summarise the notes."}]

    async def ttft(messages) -> tuple[float, str]:
        body = {"model": "bench", "messages": messages, "max_tokens": 16, "temperature": 0, "stream": True}
        t0 = time.perf_counter()
        first, text = None, ""
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                    if delta and first is None:
                        first = time.perf_counter() - t0
                    text += delta or ""
        return first, text

    t1, answer = await ttft(turn1)
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Now in one sentence."}]
    t2, _ = await ttft(turn2)
    return {"prefix_words": prefix_words, "ttft_turn1_s": t1, "ttft_turn2_s": t2, "ratio": t2 / t1}


def write_table(results: dict, args, path: Path) -> str:
    c1, c16, rnd, pre = results["single"], results["concurrent"], results["random"], results["prefix"]
    lines = [
        "# qwen15 serve load test",
        "",
        f"Command: `{results['command']}`  ",
        f"Model: {args.model or 'qwen2.5-coder-0.5b-instruct (Q4_K_M GGUF)'}; server flags: `{' '.join(results['server_flags'])}`; "
        f"{os.cpu_count()} CPU cores on this machine; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| 1 client: decode tok/s | {c1['decode_tok_s']:.2f} |",
        f"| {c16['clients']} clients: aggregate decode tok/s | {c16['decode_tok_s']:.2f} |",
        f"| aggregate / single (target >= 4x) | {c16['decode_tok_s'] / c1['decode_tok_s']:.2f}x |",
        f"| {c16['clients']} clients, steady state (all decoding, none prefilling): aggregate decode tok/s | "
        f"{c16['steady_decode_tok_s']:.2f} ({c16['steady_decode_tok_s'] / c1['decode_tok_s']:.2f}x single) |",
        f"| {c16['clients']} clients: end-to-end tok/s (incl. prefill) | {c16['tok_s']:.2f} (1 client: {c1['tok_s']:.2f}) |",
        f"| {c16['clients']} clients: TTFT p50 / p99 s | {c16['ttft_p50']:.2f} / {c16['ttft_p99']:.2f} |",
        f"| 1 client: TTFT s | {c1['ttft_p50']:.2f} |",
        f"| random run: requests (concurrency, hung up) | {rnd['requests']} ({rnd['concurrency']}, {rnd['hung_up']}) |",
        f"| random run: 5xx / client errors / other non-200 | {rnd['status_5xx']} / {rnd['client_errors']} / {rnd['status_other']} |",
        f"| random run: KV blocks in use afterwards | {rnd['kv_blocks_used_after']:.0f} |",
        f"| random run: server RSS after warm-up / at end MB | {rnd['rss_warm_mb']:.0f} / {rnd['rss_end_mb']:.0f} |",
        f"| prefix cache: TTFT turn 1 / turn 2 s ({pre['prefix_words']}-word shared prefix) | "
        f"{pre['ttft_turn1_s']:.2f} / {pre['ttft_turn2_s']:.2f} |",
        f"| prefix cache: turn 2 / turn 1 TTFT (target <= 0.3) | {pre['ratio']:.2f} |",
        "",
        f"Settings: prompt {args.prompt_words} words, {args.gen_tokens} tokens per client in the concurrency "
        f"phase; random run prompts 5..{args.max_prompt_words} words, outputs 1..{args.max_gen} tokens.",
    ]
    if args.note:
        lines += ["", args.note]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.with_suffix(".json").write_text(json.dumps(results, indent=1))
    return text


async def main_async(args) -> dict:
    port = free_port()
    flags = ["--max-batch", str(args.max_batch), "--max-queue", str(max(args.requests, 64)),
             "--token-budget", str(args.token_budget), "--kv-tokens", str(args.kv_tokens)]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    if args.quant:
        flags += ["--quant", args.quant]
    cmd = [sys.executable, "-m", "qwen15.cli", "serve", "--port", str(port), "--served-model-name", "bench", *flags]
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=httpx.Timeout(600)) as client:
            for _ in range(600):
                try:
                    if (await client.get("/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    await asyncio.sleep(0.5)
            await stream_one(client, "warm up", 4)
            results = {"command": " ".join(["python", *sys.argv]), "server_flags": flags}
            print("single client ...", file=sys.stderr)
            results["single"] = await concurrency_phase(client, 1, args.prompt_words, args.gen_tokens, 1)
            print(f"{args.clients} clients ...", file=sys.stderr)
            results["concurrent"] = await concurrency_phase(client, args.clients, args.prompt_words, args.gen_tokens, 2)
            print(f"random run of {args.requests} ...", file=sys.stderr)
            results["random"] = await random_phase(client, proc.pid, args.requests, args.concurrency,
                                                   args.max_prompt_words, args.max_gen, 3)
            print("prefix cache ...", file=sys.stderr)
            results["prefix"] = await prefix_phase(client, args.prefix_words, 4)
            return results
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model to serve (default: qwen2.5-coder-0.5b-instruct)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--prompt-words", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-prompt-words", type=int, default=200)
    p.add_argument("--max-gen", type=int, default=64)
    p.add_argument("--prefix-words", type=int, default=1200)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--quant", default=None, help="the server's --quant (default: the server's default)")
    p.add_argument("--token-budget", type=int, default=512)
    p.add_argument("--kv-tokens", type=int, default=32768)
    p.add_argument("--note", default="", help="a line added under the table (e.g. reduced counts, machine load)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "serve_load.md")
    args = p.parse_args()
    results = asyncio.run(main_async(args))
    print(write_table(results, args, args.out))


if __name__ == "__main__":
    main()
