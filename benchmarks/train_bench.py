"""LoRA training: qwen15 against transformers + PEFT on the same weights, data and configuration.

LoRA r 16 / alpha 32 / dropout 0.05 on q,k,v,o,gate,up,down, 512-token sequences (one per step), fp32,
AdamW lr 2e-4, 2 threads. The base is the packaged 0.5B GGUF, dequantized once by qwen15 and written as a
Hugging Face directory, so both systems train the same float weights on the same token ids. transformers +
PEFT run from a venv of their own (benchmarks/.venvs/train-peft, made once). Every system runs in a fresh
process per round, rounds interleaved (qwen15, transformers, qwen15, ...), with gradient checkpointing off
and on. Reported: step-0 loss (the adapters start at B = 0, so it is the base's loss), training tokens/s over
the steps after the first, and peak RSS.

    .venv/bin/python benchmarks/train_bench.py --steps 4 --rounds 1 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENVS = HERE / ".venvs"
WORK = HERE / ".cache" / "train_bench"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

QWEN15_WORKER = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    args = json.loads(sys.argv[1])
    torch.set_num_threads(args["threads"]); torch.manual_seed(0)
    from qwen15.train.forward import CausalLM, enable_grad_checkpointing, load_base
    from qwen15.train.sft import Options, make_trainable
    _, net, _ = load_base(args["model"], "float32", log=lambda s: None)
    make_trainable(net, Options(data="x", out="x"), "bench")
    if args["ckpt"]:
        enable_grad_checkpointing(net)
    root = CausalLM(net).train()
    opt = torch.optim.AdamW([p for p in root.parameters() if p.requires_grad], lr=2e-4)
    seqs = torch.load(args["ids"])
    losses, times = [], []
    for step in range(args["steps"]):
        ids = seqs[step % len(seqs)][None]
        targets = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
        t = time.perf_counter()
        logps, _ = root(ids, targets)
        loss = -logps.mean()
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t); losses.append(float(loss))
    print(json.dumps({"losses": losses, "times": times,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")

PEFT_WORKER = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    args = json.loads(sys.argv[1])
    torch.set_num_threads(args["threads"]); torch.manual_seed(0)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(args["hf_dir"], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=args["targets"],
                                             task_type="CAUSAL_LM"))
    if args["ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    seqs = torch.load(args["ids"])
    losses, times = [], []
    for step in range(args["steps"]):
        ids = seqs[step % len(seqs)][None]
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t); losses.append(float(loss))
    print(json.dumps({"losses": losses, "times": times,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def ensure_venv(name: str, packages: list[str]) -> Path:
    venv = VENVS / name
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    wanted = " ".join(packages)
    if marker.is_file() and marker.read_text() == wanted:
        return python
    print(f"[train_bench] installing {wanted} into {venv} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    links = ["--find-links", "/opt/wheels"] if Path("/opt/wheels").is_dir() else []
    subprocess.run([str(python), "-m", "pip", "install", "-q", *links, *packages], check=True)
    marker.write_text(wanted)
    return python


def prepare(model: str, seq_len: int, n_seqs: int) -> tuple[Path, Path, Path]:
    """The dequantized base as an HF directory, and n_seqs token sequences of seq_len from GSM8K's train split."""
    import torch

    from qwen15.train.forward import load_base
    from qwen15.train.sft import save_full_model
    from qwen15.weights.resolve import resolve_model

    WORK.mkdir(parents=True, exist_ok=True)
    gguf = resolve_model(model)
    hf_dir, ids_file = WORK / "hf-model", WORK / f"ids-{seq_len}.pt"
    if not (hf_dir / "model.safetensors").is_file():
        _, net, tok = load_base(str(gguf), "float32")
        hf_dir.mkdir(exist_ok=True)
        save_full_model(net, tok, hf_dir, {k: v for k, v in net.state_dict().items()})
        del net
    if not ids_file.is_file():
        from qwen15.tokenizer import Tokenizer

        tok = Tokenizer.from_file(hf_dir)
        data = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
        data = data if data.is_file() else Path("/work/shared/data/gsm8k/train.jsonl")
        stream: list[int] = []
        for line in open(data):
            r = json.loads(line)
            stream += tok.encode(tok.apply_chat_template([{"role": "user", "content": r["question"]},
                                                          {"role": "assistant", "content": r["answer"]}],
                                                         add_generation_prompt=False))
            if len(stream) >= seq_len * n_seqs:
                break
        torch.save(torch.tensor(stream[:seq_len * n_seqs]).view(n_seqs, seq_len), ids_file)
    return gguf, hf_dir, ids_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--steps", type=int, default=4, help="steps per run (the first is not timed)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default=str(HERE / "results" / "train_bench"))
    args = ap.parse_args()

    gguf, hf_dir, ids_file = prepare(args.model, args.seq_len, args.steps)
    peft_python = ensure_venv("train-peft", ["torch==2.13.0", "transformers", "peft", "accelerate"])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(args.threads)}
    systems = {"qwen15": [sys.executable, "-c", QWEN15_WORKER], "transformers+peft": [str(peft_python), "-c", PEFT_WORKER]}
    runs = []
    for rnd in range(args.rounds):
        for ckpt in (False, True):
            for name, cmd in systems.items():
                payload = {"model": str(gguf), "hf_dir": str(hf_dir), "ids": str(ids_file), "steps": args.steps,
                           "threads": args.threads, "ckpt": ckpt, "targets": TARGETS}
                out = subprocess.run(cmd + [json.dumps(payload)], capture_output=True, text=True, env=env)
                if out.returncode:
                    raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                timed = r["times"][1:] or r["times"]
                r.update(system=name, round=rnd, grad_checkpointing=ckpt,
                         tokens_per_s=args.seq_len * len(timed) / sum(timed))
                print(json.dumps({k: r[k] for k in ("system", "grad_checkpointing", "tokens_per_s", "peak_rss_mb")}
                                 | {"step0_loss": r["losses"][0]}), flush=True)
                runs.append(r)
                Path(args.out + ".json").parent.mkdir(parents=True, exist_ok=True)
                Path(args.out + ".json").write_text(json.dumps(runs, indent=1))  # after each run: partial results survive
    lines = [f"# LoRA training: qwen15 vs transformers + PEFT ({args.model}, r16, 7 projections, "
             f"{args.seq_len}-token sequences, fp32, {args.threads} threads, {args.steps} steps x {args.rounds} rounds)",
             "", "| system | grad ckpt | step-0 loss | tokens/s | peak RSS MB |", "|---|---|---|---|---|"]
    for ckpt in (False, True):
        for name in systems:
            rs = [r for r in runs if r["system"] == name and r["grad_checkpointing"] == ckpt]
            tps = sum(r["tokens_per_s"] for r in rs) / len(rs)
            rss = max(r["peak_rss_mb"] for r in rs)
            lines.append(f"| {name} | {'on' if ckpt else 'off'} | {rs[0]['losses'][0]:.5f} | {tps:.1f} | {rss:.0f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n\nCommand: `" + " ".join(["python"] + sys.argv) + "`\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
