"""qwen15 against llama.cpp (llama-cpp-python) and transformers on the same GGUF file, on this machine.

Each other system is installed by this script into a virtual environment of its own under
benchmarks/.venvs (never into the project's), then every system runs in a fresh process per round,
rounds interleaved, and the medians go into a markdown table and a bar chart.

    .venv/bin/python benchmarks/compare.py --rounds 2 --threads 2
    .venv/bin/python benchmarks/compare.py --model qwen2.5-coder-1.5b-instruct --systems llama.cpp,qwen15

The default model's table goes to results/compare.md, another model's to results/compare_<file stem>.md,
so the tables stand side by side. Every title names the CPU's vector extensions (AVX2, AVX-512, VNNI).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENVS = HERE / ".venvs"
METRICS = ("load_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb")

LLAMA_CPP = textwrap.dedent("""
    import json, resource, sys, time
    args = json.loads(sys.argv[1])
    t = time.perf_counter()
    from llama_cpp import Llama
    llm = Llama(model_path=args["model"], n_ctx=len(args["ids"]) + args["gen"] + 16, n_threads=args["threads"],
                n_threads_batch=args["threads"], n_batch=512, verbose=False)
    load_s = time.perf_counter() - t
    llm.eval(args["ids"][:8]); llm.reset()  # warm-up
    t = time.perf_counter(); llm.eval(args["ids"]); prefill = time.perf_counter() - t
    tok = llm.sample(temp=0.0)
    t = time.perf_counter()
    for _ in range(args["gen"] - 1):
        llm.eval([tok]); tok = llm.sample(temp=0.0)
    decode = time.perf_counter() - t
    print(json.dumps({"load_s": load_s, "prefill_tok_s": len(args["ids"]) / prefill,
                      "decode_tok_s": (args["gen"] - 1) / decode,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")

TRANSFORMERS = textwrap.dedent("""
    import json, os, resource, sys, time
    args = json.loads(sys.argv[1])
    t = time.perf_counter()
    import torch
    torch.set_num_threads(args["threads"])
    from transformers import AutoModelForCausalLM
    path = args["model"]
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()
    load_s = time.perf_counter() - t
    ids = torch.tensor([args["ids"]])
    with torch.no_grad():
        model(ids[:, :8])  # warm-up
        t = time.perf_counter(); out = model(ids, use_cache=True); prefill = time.perf_counter() - t
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(args["gen"] - 1):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - t
    print(json.dumps({"load_s": load_s, "prefill_tok_s": len(args["ids"]) / prefill,
                      "decode_tok_s": (args["gen"] - 1) / decode,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def ensure_venv(name: str, packages: list[str], env_extra: dict[str, str] | None = None) -> Path:
    """A virtual environment of its own for one system, made once and reused."""
    venv = VENVS / name
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    wanted = " ".join(packages)
    if marker.is_file() and marker.read_text() == wanted:
        return python
    print(f"[compare] installing {wanted} into {venv} (once; llama-cpp-python compiles for minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    links = ["--find-links", "/opt/wheels"] if Path("/opt/wheels").is_dir() else []
    env = {**os.environ, **(env_extra or {})}
    subprocess.run([str(python), "-m", "pip", "install", "-q", *links, *packages], check=True, env=env)
    marker.write_text(wanted)
    return python


def run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="packaged name or .gguf path")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--systems", default="llama.cpp,transformers,qwen15")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()

    from qwen15.engine.bench import prompt_ids
    from qwen15.tokenizer import Tokenizer
    from qwen15.weights.gguf import open_gguf
    from qwen15.weights.resolve import resolve_model

    gguf = resolve_model(args.model)
    ids = prompt_ids(Tokenizer.from_gguf_metadata(open_gguf(gguf).metadata), args.prompt_tokens)
    payload = json.dumps({"model": str(gguf), "ids": ids, "gen": args.gen_tokens, "threads": args.threads})
    systems = args.systems.split(",")
    commands = {}
    if "llama.cpp" in systems:
        py = ensure_venv("llamacpp", ["llama-cpp-python==0.3.36"], {"CMAKE_ARGS": "-DGGML_NATIVE=ON"})
        commands["llama.cpp"] = [str(py), "-c", LLAMA_CPP, payload]
    if "transformers" in systems:
        py = ensure_venv("transformers", ["torch==2.13.0", "transformers", "accelerate", "gguf"])
        commands["transformers"] = [str(py), "-c", TRANSFORMERS, payload]
    if "qwen15" in systems:
        qwen15 = ROOT / ".venv" / "bin" / "qwen15"
        if not qwen15.exists():  # a worktree without its own venv: the interpreter running this script
            qwen15 = Path(sys.executable).parent / "qwen15"
        commands["qwen15"] = [str(qwen15), "bench", "--model", str(gguf),
                              "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
                              "--threads", str(args.threads), "--json"]

    results: dict[str, list[dict]] = {name: [] for name in commands}
    for r in range(args.rounds):  # interleaved, so drift in the machine hits every system alike
        for name, cmd in commands.items():
            row = run_json(cmd)
            results[name].append(row)
            print(f"[compare] round {r + 1} {name}: " + ", ".join(f"{k} {row[k]:.2f}" for k in METRICS), flush=True)
    medians = {name: {k: statistics.median(row[k] for row in rows) for k in METRICS} for name, rows in results.items()}

    from kernel_bench import cpu_isa  # this directory is on sys.path when run as a script

    title = (f"{gguf.name}, {len(ids)}-token prompt, {args.gen_tokens} greedy tokens, {args.threads} threads, "
             f"medians of {args.rounds} interleaved rounds; CPU: {cpu_isa()}")
    lines = [title, "", "| system | load s | prefill tok/s | decode tok/s | peak RSS MB |", "|---|---|---|---|---|"]
    for name, m in medians.items():
        lines.append(f"| {name} | {m['load_s']:.2f} | {m['prefill_tok_s']:.1f} | {m['decode_tok_s']:.1f} | "
                     f"{m['peak_rss_mb']:.0f} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "compare" if args.model == ap.get_default("model") else f"compare_{gguf.stem}"
    (out / f"{stem}.md").write_text(table + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"title": title, "medians": medians, "rounds": results}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[compare] matplotlib not installed: no chart (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
    labels = {"load_s": "load (s, lower is better)", "prefill_tok_s": "prefill tok/s",
              "decode_tok_s": "decode tok/s", "peak_rss_mb": "peak RSS MB (lower is better)"}
    for ax, key in zip(axes, METRICS):
        names = list(medians)
        ax.bar(names, [medians[n][key] for n in names], color=["#888", "#c66", "#36c"][: len(names)])
        ax.set_title(labels[key], fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)
    print(f"[compare] wrote {out / f'{stem}.md'} and {out / f'{stem}.png'}")


if __name__ == "__main__":
    main()
