"""nn.Linear / nn.Embedding stand-ins that keep their weight as block int8 (see blocks.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import BlockInt8, GGUFBlocks, concat_packed, dequantize, to_blockint8
from .native import dequantize_any, kernel_call, matmul


class _BlockWeight(nn.Module):
    """Holds one compact weight: BlockInt8 as buffers q, scale (and offset when the type has mins), or
    GGUF blocks as they are in the file as buffer raw (uint8) with their ggml type."""

    def __init__(self, w: BlockInt8 | GGUFBlocks):
        super().__init__()
        self.activations = "q8"  # how the decode kernel takes activations: "q8" (int8) or "f32" (exact)
        self.packed = isinstance(w, GGUFBlocks)
        if self.packed:
            self.qtype, self.block, self.in_dim = w.qtype, 32, w.in_features
            self.interleaved = w.interleaved
            self.register_buffer("raw", w.raw)
            self.q = self.scale = self.offset = None
        else:
            self.block = w.block
            self.register_buffer("q", w.q)
            self.register_buffer("scale", w.scale)
            self.register_buffer("offset", w.offset)  # None is skipped by state_dict()
        self._call = None  # the bound decode kernel (native.KernelCall), made on first use

    @property
    def weight_data(self) -> BlockInt8 | GGUFBlocks:
        """The weight in the form this module holds it."""
        if self.packed:
            return GGUFBlocks(self.raw, self.qtype, self.in_dim, interleaved=self.interleaved)
        return BlockInt8(self.q, self.scale, self.offset, self.block)

    @property
    def blocks(self) -> BlockInt8:
        """The weight as BlockInt8 (converted, for GGUF blocks)."""
        w = self.weight_data
        return to_blockint8(w) if isinstance(w, GGUFBlocks) else w

    @property
    def nbytes(self) -> int:
        return self.weight_data.nbytes

    def linear(self, x: Tensor) -> Tensor:
        """x [..., K] @ W.T: the C kernel for small row counts (decode), dequantize + BLAS for more."""
        x2 = x.reshape(-1, x.shape[-1])
        call = self._call
        data = self.raw if self.packed else self.q
        if call is None or (call and (call.q is not data or call.activations != self.activations)):
            call = self._call = kernel_call(self.weight_data, self.activations) or False
        if call and x2.shape[0] <= call.max_rows and x2.dtype == torch.float32 and x2.device.type == "cpu":
            y = call(x2)  # it copies x2 only where its kernel needs contiguous rows
        else:
            y = matmul(x2, self.weight_data, activations=self.activations)
        return y.view(*x.shape[:-1], y.shape[-1])


class QuantLinear(_BlockWeight):
    def __init__(self, w: BlockInt8 | GGUFBlocks, bias: Tensor | None = None):
        super().__init__(w)
        self.out_features, self.in_features = w.shape
        self.bias = bias  # a Parameter (or None), like nn.Linear's

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        form = (f"gguf_type={self.qtype}{', x8' if self.interleaved else ''}" if self.packed
                else f"block={self.block}, offset={self.offset is not None}")
        return f"in_features={self.in_features}, out_features={self.out_features}, {form}, bias={self.bias is not None}"


class QuantEmbedding(_BlockWeight):
    """Looks up token rows and dequantizes only those; `linear` serves a tied lm_head."""

    def __init__(self, w: BlockInt8 | GGUFBlocks):
        super().__init__(w)
        self.num_embeddings, self.embedding_dim = w.shape

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        if self.packed:
            rows = dequantize_any(GGUFBlocks(self.raw[flat], self.qtype, self.in_dim))
        else:
            rows = dequantize(BlockInt8(self.q[flat], self.scale[flat],
                                        None if self.offset is None else self.offset[flat], self.block))
        return rows.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        form = f"gguf_type={self.qtype}" if self.packed else f"block={self.block}"
        return f"{self.num_embeddings}, {self.embedding_dim}, {form}"


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
    for name in [k for k, v in state.items() if isinstance(v, (BlockInt8, GGUFBlocks))]:
        w = state.pop(name)
        path = name.removesuffix(".weight")
        parent_name, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        fused = [p for p, f in FUSED if f == attr]
        if fused and old is None:  # a fused matrix (fuse_state): it replaces its parts' modules
            has_bias = f"{path}.bias" in state
            new = QuantLinear(w, nn.Parameter(torch.empty(w.shape[0], device="meta")) if has_bias else None)
            for part in fused[0]:
                delattr(parent, part)
        elif isinstance(old, nn.Embedding):
            new = QuantEmbedding(w)
        elif isinstance(old, nn.Linear):
            new = QuantLinear(w, old.bias)
        else:
            raise TypeError(f"{name}: cannot hold block-int8 weights in a {type(old).__name__}")
        setattr(parent, attr, new)
        held.update(f"{path}.{k}" for k in (("raw",) if isinstance(w, GGUFBlocks) else ("q", "scale", "offset")))
    return held


def concat_rows(parts: list[BlockInt8]) -> BlockInt8:
    """Stack weight matrices with the same K along the output dimension, losslessly: a block of 32 is
    split into two of 16 when the block sizes differ, and a missing offset is zero."""
    block = min(p.block for p in parts)
    with_offset = any(p.offset is not None for p in parts)

    def per_block(t: torch.Tensor, b: int) -> torch.Tensor:
        return t.repeat_interleave(b // block, dim=1) if b != block else t

    return BlockInt8(
        q=torch.cat([p.q for p in parts]),
        scale=torch.cat([per_block(p.scale, p.block) for p in parts]),
        offset=torch.cat([per_block(p.offset if p.offset is not None else torch.zeros_like(p.scale), p.block)
                          for p in parts]) if with_offset else None,
        block=block)


# Fused matrices: (the parts, the fused name) in a module. Decode then makes 4 kernel calls a layer
# instead of 7, and the small k/v matrices no longer pay a thread fork/join of their own.
FUSED = ((("q_proj", "k_proj", "v_proj"), "qkv_proj"), (("gate_proj", "up_proj"), "gate_up_proj"))


def fuse_state(state: dict) -> dict:
    """Replace compact q/k/v weights (and their biases) by one `qkv_proj` entry, and gate/up by one
    `gate_up_proj`, wherever all the parts are compact. GGUF blocks stay GGUF blocks where their types
    stack (blocks.concat_packed), else the parts become BlockInt8. Works in place on state and returns it."""
    compact = (BlockInt8, GGUFBlocks)
    for key in [k for k in state if isinstance(state[k], compact)]:
        for parts, fused in FUSED:
            suffix = f".{parts[0]}.weight"
            if not key.endswith(suffix):
                continue
            prefix = key[: -len(suffix)]
            names = [f"{prefix}.{p}" for p in parts]
            if not all(isinstance(state.get(f"{n}.weight"), compact) for n in names):
                continue
            weights = [state.pop(f"{n}.weight") for n in names]
            biases = [state.pop(f"{n}.bias", None) for n in names]
            stacked = concat_packed(weights) if all(isinstance(w, GGUFBlocks) for w in weights) else None
            if stacked is None:
                weights = [to_blockint8(w) if isinstance(w, GGUFBlocks) else w for w in weights]
            state[f"{prefix}.{fused}.weight"] = stacked if stacked is not None else concat_rows(weights)
            if any(b is not None for b in biases):
                state[f"{prefix}.{fused}.bias"] = torch.cat(
                    [b if b is not None else torch.zeros(w.shape[0]) for b, w in zip(biases, weights)])
    return state


def set_activations(model: nn.Module, activations: str) -> None:
    """Choose the decode kernel of every block-int8 module: "q8" (int8 activations) or "f32" (exact)."""
    from .native import ACTIVATIONS

    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    for m in model.modules():
        if isinstance(m, _BlockWeight):
            m.activations = activations
    if hasattr(model, "_native"):
        model._native = None  # whether the C layers apply is decided again


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, _BlockWeight) for m in model.modules())
