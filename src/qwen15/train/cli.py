"""`qwen15 train sft|dpo`: the flags map one to one onto `train.sft.Options`."""

from __future__ import annotations

import argparse
import sys


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="packaged name, hub name, local directory or .gguf file "
                                                  "(a GGUF is dequantized to float once for training)")
    p.add_argument("--data", required=True, help="training JSONL")
    p.add_argument("--eval-data", default=None, help="held-out JSONL: its loss at the end, and every --eval-every steps")
    p.add_argument("--out", required=True, help="output directory: adapter or model, checkpoints, metrics.jsonl, loss.png")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="full", action="store_false", help="train a LoRA adapter (default)")
    mode.add_argument("--full", dest="full", action="store_true", help="train every weight")
    p.set_defaults(full=False)  # store_false above would otherwise make --full the default
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--target", default="q,k,v,o,gate,up,down", help="LoRA targets (comma list of q,k,v,o,gate,up,down)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (over epochs)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 2e-4 LoRA, 2e-5 full)")
    p.add_argument("--warmup", type=float, default=0.03, help="warmup steps, or a fraction of all steps if < 1 "
                                                             "(then cosine decay to 0)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per micro-batch (padded rows x length)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (per process)")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--too-long", choices=("drop", "truncate", "error"), default="drop",
                   help="examples longer than --max-seq-len: drop them, truncate them, or stop (each is named)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (default 1.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (per process)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None, help="write a checkpoint every N steps")
    p.add_argument("--resume", default=None, help="a checkpoint directory (or an --out holding checkpoint-N)")
    p.add_argument("--nproc", type=int, default=None, help="run under torchrun with N processes (FSDP2)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")


def add_train_parser(sub) -> argparse._SubParsersAction:
    """`train` with its subcommands; returns its sub-parsers so that others (merge) can join."""
    p = sub.add_parser("train", help="fine-tune: sft (LoRA or full), dpo")
    tsub = p.add_subparsers(dest="train_command", required=True)

    s = tsub.add_parser("sft", help="supervised fine-tuning on a JSONL of messages, prompt/completion or text")
    _add_common(s)
    s.add_argument("--packing", action="store_true", help="pack several examples per sequence "
                                                          "(per-document causal mask, positions from 0)")
    s.set_defaults(func=cmd_train, train_kind="sft")

    d = tsub.add_parser("dpo", help="direct preference optimisation on a JSONL of prompt/chosen/rejected")
    _add_common(d)
    d.add_argument("--beta", type=float, default=0.1)
    d.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO (0 = the sigmoid loss)")
    d.set_defaults(func=cmd_train, train_kind="dpo")
    return tsub


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .sft import Options

    if args.nproc is not None:
        if args.nproc < 1:
            print(f"qwen15: error: --nproc must be >= 1, got {args.nproc}", file=sys.stderr)
            return 2
        from .distributed import launch

        return launch(args.nproc, sys.argv[1:])
    names = {f.name for f in fields(Options)}
    opts = Options(**{k: v for k, v in vars(args).items() if k in names})
    if args.train_kind == "sft":
        from .sft import run, sft_task

        result = run(opts, sft_task, "sft")
    else:
        from .dpo import dpo_task
        from .sft import run

        result = run(opts, dpo_task, "dpo")
    return 130 if result.stopped else 0
