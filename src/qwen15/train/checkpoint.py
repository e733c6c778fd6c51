"""Checkpoints that a run resumes from exactly: trained weights, optimizer, scheduler, RNG states, data position.

    out/checkpoint-{step}/
        trainable.safetensors   every trained parameter, whole (unsharded), by its name in the model
        adapter/                the adapter in PEFT's format (LoRA runs), usable as it is
        optimizer.pt            AdamW's state, whole (so any world size can resume it), and the scheduler's
        rng-{rank}.pt           torch / python RNG states of each rank at the start of the next step
        state.json              step, micro-batches consumed, the options of the run

Written to `.checkpoint-{step}.tmp` and renamed when complete: a killed save leaves no half checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from torch import nn

from .distributed import World
from .forward import TrainError


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def save(out: Path, step: int, state: dict, root: nn.Module, optimizer, scheduler, rng: dict, world: World,
         save_adapter=None) -> Path:
    """Write checkpoint-{step} under out (every rank calls this: gathering the shards is collective)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    full = _options(full_state_dict=True, cpu_offload=True)
    trained = {n for n, p in root.named_parameters() if p.requires_grad}
    weights = get_model_state_dict(root, options=full)
    optim = get_optimizer_state_dict(root, optimizer, options=full)
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    if world.main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file({n: t.contiguous() for n, t in weights.items() if n in trained}, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optim, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        if save_adapter is not None:
            save_adapter(tmp / "adapter", {n: t for n, t in weights.items() if n in trained})
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    world.barrier()
    torch.save(rng, out / f".rng-{step}-{world.rank}.pt")
    world.barrier()
    if world.main:
        for r in range(world.size):  # every rank's RNG state joins the checkpoint before the rename
            os.replace(out / f".rng-{step}-{r}.pt", tmp / f"rng-{r}.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    world.barrier()
    return final


def find(resume: str | Path) -> Path:
    """A checkpoint directory, or an output directory holding checkpoint-N (the latest is taken)."""
    path = Path(resume)
    if (path / "state.json").is_file():
        return path
    found = sorted(path.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1)
    found = [p for p in found if (p / "state.json").is_file()]
    if not found:
        raise TrainError(f"--resume {path}: no checkpoint there (expected a checkpoint-N directory with state.json, "
                         f"or an output directory holding one)")
    return found[-1]


def load(path: Path, root: nn.Module, optimizer, scheduler, world: World) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNG; return state.json."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / "trainable.safetensors"))
        saved = torch.load(path / "optimizer.pt", weights_only=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise TrainError(f"--resume {path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    trained = {n for n, p in root.named_parameters() if p.requires_grad}
    if set(weights) != trained:
        raise TrainError(f"--resume {path}: its trained parameters do not match this run's "
                         f"(LoRA vs --full, or other --target / --lora-r?)")
    opts = _options(full_state_dict=True, strict=False)
    set_model_state_dict(root, weights, options=opts)
    set_optimizer_state_dict(root, optimizer, saved["optimizer"], options=opts)
    scheduler.load_state_dict(saved["scheduler"])
    rng_file = path / f"rng-{world.rank}.pt"
    if rng_file.is_file():  # another world size: ranks without a saved state keep their seeded one
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state
