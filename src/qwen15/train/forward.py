"""The training forward: a base model loaded in float, and a module that turns a batch into token log-probs.

Training runs the PyTorch layers of model.py (never the C inference layers: those have no backward, and
model.py takes them only without autograd on compact weights, which a training model never holds).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import Qwen15Error
from ..model import Transformer
from .data import IGNORE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class TrainError(Qwen15Error, ValueError):
    """A training option or state that cannot be used."""


def load_base(model: str | Path | None, dtype: str, device: str = "cpu", log=print):
    """(path, model, tokenizer) with every weight as a float tensor of dtype; a GGUF is dequantized once."""
    from ..engine.engine import load_checkpoint
    from ..weights.resolve import resolve_model

    if dtype not in DTYPES:
        raise TrainError(f"unknown --dtype {dtype!r}: expected float32 or bfloat16")
    path = resolve_model(None if model is None else str(model))
    _, net, tokenizer = load_checkpoint(path, DTYPES[dtype], device, quant="none")
    if path.is_file():
        dense = sum(p.numel() * p.element_size() for p in net.parameters())
        log(f"{path.name}: GGUF dequantized to {dtype} for training: {dense / 2**20:,.0f} MiB of weights "
            f"(the file is {path.stat().st_size / 2**20:,.0f} MiB)")
    return path, net, tokenizer


def enable_grad_checkpointing(net: Transformer) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (torch.utils.checkpoint).

    The layer's forward is wrapped on the instance, so module names, state dicts and FSDP's hooks (which
    run around forward) stay as they are."""
    from torch.utils.checkpoint import checkpoint

    for layer in net.model.layers:
        inner = layer.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


class CausalLM(nn.Module):
    """batch -> log-probabilities of the trained target tokens, and which row each came from.

    Only the positions the loss reads go through the vocabulary matmul (a prompt's positions never do).
    Being one module, it is also the root that FSDP shards last (its forward gathers the embedding,
    final norm and head)."""

    def __init__(self, net: Transformer):
        super().__init__()
        self.net = net

    def forward(self, ids: Tensor, targets: Tensor, positions: Tensor | None = None,
                mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = self.net.hidden_states(ids, positions=positions, mask=mask)  # [B, T, H]
        rows, cols = (targets != IGNORE).nonzero(as_tuple=True)
        logits = self.net.head(h[rows, cols]).float()  # [N, vocab]
        logps = -F.cross_entropy(logits, targets[rows, cols], reduction="none")  # [N]
        return logps, rows


def row_sums(logps: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    """Per-row sums of token log-probs [n_rows]."""
    return torch.zeros(n_rows, dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)
