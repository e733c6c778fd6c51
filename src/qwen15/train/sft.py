"""Supervised fine-tuning: one training loop, LoRA (default) or full, on one process or FSDP2 across many.

    load base (float) -> LoRA or full -> [FSDP2] -> AdamW + warmup/cosine -> for each step:
        its micro-batches (grad accumulation; each rank takes every world-th one) -> backward
        -> clip -> step -> metrics.jsonl / progress bar -> [eval] -> [checkpoint]
    -> adapter (PEFT format) or model (HF directory) in --out, loss.png

The loss of a step is the sum of its target tokens' losses over the whole step (all micro-batches, all
ranks) divided by their count, so grad accumulation, packing and world size do not change it.
The order of the data is fixed by --seed: step s always reads the same micro-batches, which is what
makes a resumed run (and a run on another world size with the same global batch) repeat the loss sequence.
`dpo.py` runs this same loop with its own loss.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
import types
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoint
from .data import Row, collate, load_sft_data, make_microbatches, make_rows
from .distributed import World, full_tensor, setup, shard, shutdown
from .forward import CausalLM, TrainError, enable_grad_checkpointing, load_base
from .metrics import RunLog, plot_loss

TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
           "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@dataclass
class Options:
    """The options of `qwen15 train sft` (and, with the DPO ones, `train dpo`); CLI flags use the same names."""

    model: str | None = None
    data: str = ""
    out: str = ""
    eval_data: str | None = None
    full: bool = False  # train every weight instead of a LoRA adapter
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target: str = "q,k,v,o,gate,up,down"
    epochs: int = 1
    max_steps: int | None = None
    lr: float | None = None  # default 2e-4 for LoRA, 2e-5 for --full
    warmup: float = 0.03  # steps, or a fraction of all steps when < 1
    weight_decay: float = 0.0
    batch_tokens: int = 4096
    grad_accum: int = 1
    max_seq_len: int = 2048
    too_long: str = "drop"
    packing: bool = False
    grad_clip: float | None = 1.0
    seed: int = 0
    grad_checkpointing: bool = False
    dtype: str = "float32"
    threads: int | None = None
    device: str = "cpu"
    eval_every: int | None = None
    save_every: int | None = None
    resume: str | None = None
    progress: bool | None = None  # the progress bar (default: when stderr is a terminal)
    # DPO
    beta: float = 0.1
    label_smoothing: float = 0.0

    def check(self) -> None:
        positive = {"epochs": self.epochs, "batch_tokens": self.batch_tokens, "grad_accum": self.grad_accum,
                    "max_seq_len": self.max_seq_len, "lora_r": self.lora_r}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("max_steps", "eval_every", "save_every", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise TrainError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not self.data:
            raise TrainError("--data is required: a JSONL file of training records")
        if not self.out:
            raise TrainError("--out is required: the directory the adapter/model, checkpoints and metrics go to")
        if self.lr is not None and not self.lr > 0:
            raise TrainError(f"--lr must be > 0, got {self.lr}")
        if self.warmup < 0:
            raise TrainError(f"--warmup must be >= 0, got {self.warmup}")
        if not 0 <= self.lora_dropout < 1:
            raise TrainError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise TrainError(f"--grad-clip must be > 0, got {self.grad_clip}")
        if not 0 <= self.label_smoothing < 0.5:
            raise TrainError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        unknown = [t for t in self.target.split(",") if t.strip() not in TARGETS]
        if unknown:
            raise TrainError(f"--target {self.target!r}: unknown {', '.join(unknown)}; expected a comma list of "
                             f"{', '.join(TARGETS)}")


def targets(spec: str = "q,k,v,o,gate,up,down") -> list[str]:
    return [TARGETS[t.strip()] for t in spec.split(",") if t.strip() in TARGETS]


# ---- the pieces of a run -----------------------------------------------------------------------------
def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup over `warmup` steps, then cosine decay to 0 at `total` (the factor for step s)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def make_trainable(net, opts: Options, base_name: str):
    """Freeze the base and add LoRA adapters (default), or train every weight (--full).

    Returns save_adapter(directory, trained_weights) for LoRA runs, None for --full."""
    if opts.full:
        for p in net.parameters():
            p.requires_grad_(True)
        return None
    from .. import lora

    lora.apply_lora(net, targets=targets(opts.target), r=opts.lora_r, alpha=opts.lora_alpha,
                    dropout=opts.lora_dropout, freeze_base=True)

    def save_adapter(directory: Path, trained: dict[str, torch.Tensor]) -> None:
        # trained: the gathered (unsharded) adapter tensors by their names under CausalLM:
        # `net.<module>.lora_A.default.weight` -> PEFT's `base_model.model.<module>.lora_A.weight`.
        state = {lora.PEFT_PREFIX + k.removeprefix("net.").replace(f".{lora.DEFAULT}.weight", ".weight"): v.float()
                 for k, v in trained.items()}
        lora.save_adapter(net, directory, base_model_name_or_path=base_name, state=state)
    return save_adapter


def save_full_model(net, tokenizer, out: Path, weights: dict[str, torch.Tensor]) -> None:
    """--full: an HF model directory (config.json, model.safetensors, tokenizer) that --model takes."""
    from safetensors.torch import save_file

    config = {k: v for k, v in net.config.to_dict().items() if v is not None}
    config.update(architectures=["Qwen2MoeForCausalLM" if net.config.is_moe else "Qwen2ForCausalLM"],
                  torch_dtype=str(next(iter(weights.values())).dtype).removeprefix("torch."))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k.removeprefix("net."): v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    tokenizer._tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": tokenizer.chat_template if tokenizer.has_own_chat_template else None,
        "eos_token": tokenizer.id_to_token(tokenizer.eos_token_ids[0]) if tokenizer.eos_token_ids else None,
        "pad_token": tokenizer.id_to_token(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else None,
    }, indent=1))


@dataclass
class Task:
    """What differs between SFT and DPO: the micro-batch schedule of an epoch, a micro-batch's loss, its weight."""

    epoch_microbatches: Callable[[int], list]  # epoch -> micro-batches (same on every rank)
    loss: Callable[[CausalLM, Any], tuple[torch.Tensor, dict[str, float]]]  # summed loss, summed metrics
    weight: Callable[[Any], int]  # what a step's loss is averaged over (target tokens; pairs)
    tokens: Callable[[Any], int]  # tokens a micro-batch holds (for tokens/s)
    eval_microbatches: list | None = None
    before_training: Callable[[CausalLM], None] | None = None


@dataclass
class Result:
    out: Path
    losses: list[float] = field(default_factory=list)  # train loss of each step this call ran
    steps: int = 0  # the last finished step
    stopped: bool = False  # interrupted (Ctrl-C): a checkpoint was saved
    checkpoint: Path | None = None
    metrics: list[dict] = field(default_factory=list)


class _Stop:
    """Ctrl-C (or SIGTERM, which torchrun sends its workers on Ctrl-C) sets a flag; the loop finishes its step,
    saves a checkpoint and stops. A second one aborts."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        if threading_main():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nqwen15 train: stopping after this step to save a checkpoint (Ctrl-C again aborts)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, previous in self.previous.items():
            signal.signal(s, previous)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def run(opts: Options, make_task: Callable[[Any, Options, World, Callable], Task], kind: str,
        on_step: Callable[[int, dict], None] | None = None) -> Result:
    """Load, prepare, train and save: the loop both `sft` and `dpo` run."""
    opts.check()
    world = setup(opts.device)
    out = Path(opts.out)

    def log(text: str) -> None:
        if world.main:
            print(text, file=sys.stderr, flush=True)

    try:
        return _run(opts, make_task, kind, on_step, world, out, log)
    finally:
        shutdown(world)


def _run(opts, make_task, kind, on_step, world: World, out: Path, log) -> Result:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    random.seed(opts.seed)
    device = opts.device if not opts.device.startswith("cuda") or not world.distributed else f"cuda:{world.local_rank}"
    path, net, tokenizer = load_base(opts.model, opts.dtype, device, log=log)
    task = make_task(tokenizer, opts, world, log)
    torch.manual_seed(opts.seed)  # adapters initialise the same whatever loading drew
    save_adapter = make_trainable(net, opts, str(opts.model or path.name))
    if opts.grad_checkpointing:
        enable_grad_checkpointing(net)
    root = CausalLM(net)
    n_trained = sum(p.numel() for p in root.parameters() if p.requires_grad)
    log(f"{kind}: training {n_trained:,} of {sum(p.numel() for p in root.parameters()):,} "
        f"parameters ({'full' if opts.full else f'LoRA r={opts.lora_r} alpha={opts.lora_alpha:g}'}), "
        f"world size {world.size}")
    if task.before_training is not None:
        task.before_training(root)  # e.g. DPO's reference log-probs, before sharding
    if world.distributed:
        shard(root, net.model.layers)
    trained = [p for p in root.parameters() if p.requires_grad]  # after sharding: FSDP2 swaps in its own

    # The schedule: every epoch's micro-batches, grouped into steps of grad_accum x world size.
    per_step = opts.grad_accum * world.size
    steps: list[list] = []
    epoch = 0
    while True:
        mbs = task.epoch_microbatches(epoch)
        steps += [mbs[i:i + per_step] for i in range(0, len(mbs), per_step)]
        epoch += 1
        if (opts.max_steps is None and epoch >= opts.epochs) or (opts.max_steps is not None and len(steps) >= opts.max_steps):
            break
    total = opts.max_steps or len(steps)
    steps = steps[:total]
    warmup = int(opts.warmup * total) if opts.warmup < 1 else int(opts.warmup)
    lr = opts.lr or (2e-5 if opts.full else 2e-4)
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=opts.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total))

    start = 0
    if opts.resume:
        ckpt = checkpoint.find(opts.resume)
        state = checkpoint.load(ckpt, root, optimizer, scheduler, world)
        start = int(state["step"])
        log(f"resumed from {ckpt} at step {start} of {total}")
        if start >= total:
            log(f"nothing left to train: the checkpoint is at step {start}, the run has {total} steps")

    out.mkdir(parents=True, exist_ok=True)
    if world.main:
        (out / "options.json").write_text(json.dumps(asdict(opts), indent=1))
    runlog = RunLog(out, total, start, world.main, opts.progress)
    result = Result(out=out, steps=start)
    rng_at_step = checkpoint.rng_state()

    def save(step: int) -> Path:
        state = {"step": step, "microbatches": sum(len(s) for s in steps[:step]), "total_steps": total,
                 "kind": kind, "world_size": world.size, "options": asdict(opts)}
        return checkpoint.save(out, step, state, root, optimizer, scheduler, rng_at_step, world, save_adapter)

    root.train()
    with _Stop() as stop:
        for step in range(start, total):
            rng_at_step = checkpoint.rng_state()  # a checkpoint taken after this step resumes from here
            record = _train_step(root, task, steps[step], world, trained, opts.grad_clip, optimizer, scheduler)
            record = {"step": step + 1, **record}
            if task.eval_microbatches and ((opts.eval_every and (step + 1) % opts.eval_every == 0) or step + 1 == total):
                record.update(evaluate(root, task, world))
            runlog.step(record, int(record.pop("_tokens")))
            result.losses.append(record["loss"])
            result.metrics.append(record)
            result.steps = step + 1
            if on_step is not None:
                on_step(step + 1, record)
            rng_at_step = checkpoint.rng_state()
            stopping = world.all_sum([float(stop.requested)])[0] > 0  # every rank stops at the same step
            if stopping or (opts.save_every and (step + 1) % opts.save_every == 0 and step + 1 < total):
                result.checkpoint = save(step + 1)
                runlog.write(f"checkpoint: {result.checkpoint}")
            if stopping:
                result.stopped = True
                break
    runlog.close()
    if result.stopped:
        log(f"stopped at step {result.steps} of {total}; resume with --resume {result.checkpoint}")
        return result
    _save_final(root, net, tokenizer, out, save_adapter, world, log)
    if world.main:
        png = plot_loss(out, log)
        if png:
            log(f"loss curve: {png}")
    return result


def _train_step(root, task: Task, mbs: list, world: World, trained, grad_clip, optimizer, scheduler) -> dict:
    """One optimizer step over the step's micro-batches (this rank's share), returning its metrics."""
    total_weight = sum(task.weight(mb) for mb in mbs)  # the same on every rank: the schedule is shared
    mine = mbs[world.rank::world.size]
    rounds = -(-len(mbs) // world.size)  # every rank runs as many forward/backward passes (FSDP's collectives)
    sums: dict[str, float] = {}
    tokens = 0
    t0 = time.perf_counter()
    for j in range(rounds):
        mb, scale = (mine[j], 1.0) if j < len(mine) else (mbs[0], 0.0)  # a rank short of data adds zero
        loss_sum, metrics = task.loss(root, mb)
        # FSDP averages gradients over ranks; * world.size turns that average back into the global sum.
        (loss_sum * (scale * world.size / total_weight)).backward()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v * scale
        tokens += task.tokens(mb) if scale else 0
    keys = sorted(sums)
    totals = world.all_sum([sums[k] for k in keys] + [float(tokens)])
    record = {k: v / total_weight for k, v in zip(keys, totals)}
    record["lr"] = scheduler.get_last_lr()[0]
    if grad_clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(trained, grad_clip)
        record["grad_norm"] = float(full_tensor(norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    record["_tokens"] = totals[-1]
    record["step_s"] = round(time.perf_counter() - t0, 3)
    return record


@torch.no_grad()
def evaluate(root, task: Task, world: World) -> dict:
    root.eval()
    mbs = task.eval_microbatches
    mine = mbs[world.rank::world.size]
    sums: dict[str, float] = {}
    for j in range(-(-len(mbs) // world.size)):
        mb, scale = (mine[j], 1.0) if j < len(mine) else (mbs[0], 0.0)
        loss_sum, metrics = task.loss(root, mb)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v * scale
    root.train()
    keys = sorted(sums)
    totals = world.all_sum([sums[k] for k in keys])
    weight = sum(task.weight(mb) for mb in mbs)
    return {f"eval_{k}": v / weight for k, v in zip(keys, totals)}


def _save_final(root, net, tokenizer, out: Path, save_adapter, world: World, log) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.main:
        return
    if save_adapter is not None:
        trained = {n for n, p in root.named_parameters() if p.requires_grad}
        save_adapter(out, {n: t for n, t in weights.items() if n in trained})
        log(f"adapter (PEFT format): {out}")
    else:
        save_full_model(net, tokenizer, out, weights)
        log(f"model (Hugging Face directory): {out}")


# ---- SFT -------------------------------------------------------------------------------------------------
def sft_task(tokenizer, opts: Options, world: World, log) -> Task:
    examples = load_sft_data(opts.data, tokenizer, opts.max_seq_len, opts.too_long, log)
    n_trained = sum(sum(e.trained[1:]) for e in examples)
    log(f"{opts.data}: {len(examples)} examples, {sum(len(e) for e in examples):,} tokens "
        f"({n_trained:,} trained){' packed' if opts.packing else ''}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_ids or [0])[0]

    def loss(root: CausalLM, mb: list[Row]):
        batch = collate(mb, pad, opts.packing)
        dev = next(root.parameters()).device
        logps, _ = root(**{k: (v.to(dev) if v is not None else None) for k, v in batch.items()})
        loss_sum = -logps.sum()
        return loss_sum, {"loss": float(loss_sum.detach())}

    eval_mbs = None
    if opts.eval_data:
        ev = load_sft_data(opts.eval_data, tokenizer, opts.max_seq_len, opts.too_long, log)
        eval_mbs = make_microbatches(make_rows(ev, opts.max_seq_len, opts.packing, seed=0, epoch=0), opts.batch_tokens)
    return Task(
        epoch_microbatches=lambda epoch: make_microbatches(
            make_rows(examples, opts.max_seq_len, opts.packing, opts.seed, epoch), opts.batch_tokens),
        loss=loss,
        weight=lambda mb: sum(r.targets for r in mb),
        tokens=lambda mb: sum(len(r.ids) for r in mb),
        eval_microbatches=eval_mbs,
    )


def sft(model: str | None = None, data: str = "", out: str = "", *, on_step=None, **options: Any) -> Result:
    """Fine-tune a model on a JSONL file: `qwen15.train.sft(model=..., data=..., out=..., lora_r=16, ...)`.

    Takes the options of `qwen15 train sft` (see Options; flags with '-' become '_')."""
    known = {f.name for f in fields(Options)}
    bad = sorted(set(options) - known)
    if bad:
        raise TrainError(f"unknown option(s) {', '.join(bad)}: expected some of {', '.join(sorted(known))}")
    opts = Options(model=model, data=str(data), out=str(out), **options)
    return run(opts, sft_task, "sft", on_step)


class _CallableModule(types.ModuleType):
    """Importing this module binds `qwen15.train.sft` to it, over the function of that name that the package
    exports: calling the module calls the function, so `qwen15.train.sft(...)` works either way."""

    def __call__(self, *args, **kwargs):
        return sft(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
