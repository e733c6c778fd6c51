"""nn.Linear / nn.Embedding stand-ins that keep their weight as block int8 (see blocks.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import BlockInt8, dequantize
from .native import matmul


class _BlockWeight(nn.Module):
    """Holds one BlockInt8 as buffers q, scale (and offset when the type has mins)."""

    def __init__(self, w: BlockInt8):
        super().__init__()
        self.block = w.block
        self.register_buffer("q", w.q)
        self.register_buffer("scale", w.scale)
        self.register_buffer("offset", w.offset)  # None is skipped by state_dict()

    @property
    def blocks(self) -> BlockInt8:
        return BlockInt8(self.q, self.scale, self.offset, self.block)

    def linear(self, x: Tensor) -> Tensor:
        """x [..., K] @ W.T: the C kernel for up to 16 rows (decode), dequantize + BLAS for more."""
        y = matmul(x.reshape(-1, x.shape[-1]), self.blocks)
        return y.view(*x.shape[:-1], y.shape[-1])


class QuantLinear(_BlockWeight):
    def __init__(self, w: BlockInt8, bias: Tensor | None = None):
        super().__init__(w)
        self.out_features, self.in_features = w.q.shape
        self.bias = bias  # a Parameter (or None), like nn.Linear's

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}, " \
               f"offset={self.offset is not None}, bias={self.bias is not None}"


class QuantEmbedding(_BlockWeight):
    """Looks up token rows and dequantizes only those; `linear` serves a tied lm_head."""

    def __init__(self, w: BlockInt8):
        super().__init__(w)
        self.num_embeddings, self.embedding_dim = w.q.shape

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        rows = BlockInt8(self.q[flat], self.scale[flat], None if self.offset is None else self.offset[flat],
                         self.block)
        return dequantize(rows).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, block={self.block}"


def linear(h: Tensor, module: nn.Module) -> Tensor:
    """h @ W.T for a dense (nn.Linear / nn.Embedding) or block-int8 module's weight, without its bias."""
    if isinstance(module, _BlockWeight):
        return module.linear(h)
    return F.linear(h, module.weight)


def quantize_model(model: nn.Module, state: dict) -> set[str]:
    """Swap in QuantLinear / QuantEmbedding for every `<module>.weight` in state that is a BlockInt8.

    Removes those entries from state (the rest is loaded as usual) and returns the state-dict keys the
    new modules hold, which a later load_state_dict(strict=False) will report as missing."""
    held: set[str] = set()
    for name in [k for k, v in state.items() if isinstance(v, BlockInt8)]:
        w = state.pop(name)
        path = name.removesuffix(".weight")
        parent_name, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        if isinstance(old, nn.Embedding):
            new = QuantEmbedding(w)
        elif isinstance(old, nn.Linear):
            new = QuantLinear(w, old.bias)
        else:
            raise TypeError(f"{name}: cannot hold block-int8 weights in a {type(old).__name__}")
        setattr(parent, attr, new)
        held.update(f"{path}.{k}" for k in ("q", "scale", "offset"))
    return held


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, _BlockWeight) for m in model.modules())
