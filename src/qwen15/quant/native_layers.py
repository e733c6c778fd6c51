"""The decoder layers in one C call (layers.c) for decode steps and short forwards of one sequence.

At one token a step, the matmuls of the 0.5B take ~30 ms and the ~45 small PyTorch ops a layer between
them another ~14 ms, nearly all dispatch overhead. `NativeLayers` hands the layers' block-int8 weights,
norms and KV cache to C once and then runs all layers for up to MAX_ROWS tokens in one call.

It applies to dense models whose projections are block-int8 (compact GGUF weights, fused q/k/v and
gate/up), float32 on the CPU, without a sliding window: one sequence over the engine's KVCache (`forward`),
or the tokens of a serving step over the paged cache (`forward_rows`); everything else keeps the PyTorch
path. Each row is computed exactly as a one-token step would be (see layers.c), so
speculative verification still reproduces plain greedy decoding bit for bit. QWEN15_NATIVE_LAYERS=0
turns it off.
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch import Tensor

from ..engine.kv_cache import KVCache
from .modules import QuantLinear, _BlockWeight
from .native import NATIVE_MAX_ROWS, kernel_call, load_library, q8_supported

MAX_ROWS = NATIVE_MAX_ROWS["q8"]  # the decode kernels' range; longer chunks use BLAS


def kernel_rows(module) -> int:
    """Rows up to which `module.linear` (a QuantLinear / QuantEmbedding) multiplies in its C kernel; past that
    it dequantizes and uses BLAS (other arithmetic). 0: no kernel (dense, no library, or always BLAS). A caller
    that wants a row's result independent of how many rows come with it calls in chunks of this many."""
    if not isinstance(module, _BlockWeight):
        return 0
    call = kernel_call(module.weight_data, module.activations)
    return call.max_rows if call else 0


class QMat(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("offset", ctypes.c_void_p),
                ("block", ctypes.c_int), ("out", ctypes.c_int), ("in_", ctypes.c_int), ("q8", ctypes.c_int),
                ("raw", ctypes.c_void_p), ("qtype", ctypes.c_int)]


class QLayer(ctypes.Structure):
    _fields_ = [("qkv", QMat), ("o", QMat), ("gate_up", QMat), ("down", QMat), ("qkv_bias", ctypes.c_void_p),
                ("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]


class QDims(ctypes.Structure):
    _fields_ = [("layers", ctypes.c_int), ("hidden", ctypes.c_int), ("heads", ctypes.c_int),
                ("kv_heads", ctypes.c_int), ("head_dim", ctypes.c_int), ("inter", ctypes.c_int),
                ("nthreads", ctypes.c_int), ("head_stride", ctypes.c_long), ("slot_stride", ctypes.c_long),
                ("eps", ctypes.c_float)]


def _qmat(m: QuantLinear) -> QMat:
    if m.packed:  # GGUF blocks: int8 activations always (supported() asks for "q8")
        return QMat(None, None, None, 32, m.out_features, m.in_features, 1, m.raw.data_ptr(), m.weight_data.kernel_qtype)
    w = m.blocks
    return QMat(w.q.data_ptr(), w.scale.data_ptr(), w.offset.data_ptr() if w.offset is not None else None,
                w.block, w.q.shape[0], w.q.shape[1], int(m.activations == "q8" and q8_supported(w)), None, 0)


def _contiguous_f32(*tensors: Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu" for t in tensors)


def _on_cpu(m: QuantLinear) -> bool:
    if m.packed:  # the exact (float activation) path of GGUF blocks is dequantize + BLAS: PyTorch layers
        return m.raw.device.type == "cpu" and m.raw.is_contiguous() and m.activations == "q8"
    return m.q.device.type == "cpu" and m.q.is_contiguous() and m.scale.is_contiguous()


def supported(model) -> bool:
    """Can NativeLayers run this model (before looking at the cache and the rows)?"""
    from ..model import MLP

    c = model.config
    if os.environ.get("QWEN15_NATIVE_LAYERS", "1") == "0" or load_library() is None or c.head_dim > 512:
        return False
    if c.num_attention_heads % c.num_key_value_heads:
        return False
    for layer in model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        if not isinstance(mlp, MLP) or a.window is not None:
            return False
        mats = [a.qkv_proj, a.o_proj, mlp.gate_up_proj, mlp.down_proj]
        if not all(isinstance(m, QuantLinear) and _on_cpu(m) for m in mats) or a.o_proj.bias is not None:
            return False
        if mlp.down_proj.bias is not None or mlp.gate_up_proj.bias is not None:
            return False
        if a.qkv_proj.bias is not None and not _contiguous_f32(a.qkv_proj.bias):
            return False
        if not _contiguous_f32(layer.input_layernorm.weight, layer.post_attention_layernorm.weight):
            return False
    return True


class NativeLayers:
    """All decoder layers of `model` as one C call over a given KVCache (rebuilt when the cache changes)."""

    def __init__(self, model):
        self.model = model
        self.lib = load_library()
        self._cache_id = None
        self._activations = None
        self._layers = None
        self._dims = None

    def _bind(self, cache) -> None:
        """Point the C structures at the weights and at this cache: the engine's KVCache [L, 1, KV, max_len, D]
        or the server's PagedKVCache pool [L, slots, KV, D]."""
        c = self.model.config
        paged = not isinstance(cache, KVCache)
        layers = (QLayer * c.num_hidden_layers)()
        for i, layer in enumerate(self.model.model.layers):
            a, mlp = layer.self_attn, layer.mlp
            bias = a.qkv_proj.bias
            k, v = (cache.k[i], cache.v[i]) if paged else (cache.k[i, 0], cache.v[i, 0])
            layers[i] = QLayer(_qmat(a.qkv_proj), _qmat(a.o_proj), _qmat(mlp.gate_up_proj), _qmat(mlp.down_proj),
                               bias.data_ptr() if bias is not None else None,
                               layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                               k.data_ptr(), v.data_ptr())
        D, KV = c.head_dim, c.num_key_value_heads
        head_stride, slot_stride = (D, KV * D) if paged else (cache.max_len * D, D)
        self._layers = layers
        self._dims = QDims(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, KV, D, c.intermediate_size,
                           1, head_stride, slot_stride, c.rms_norm_eps)
        self._cache_id = (id(cache), cache.k.data_ptr())
        self._activations = self.model.model.layers[0].self_attn.qkv_proj.activations
        self._cache = cache  # keeps the pointers above alive

    def applies(self, input_ids: Tensor, cache, start_pos) -> bool:
        return (isinstance(cache, KVCache) and isinstance(start_pos, int) and input_ids.shape[0] == 1
                and input_ids.shape[1] <= MAX_ROWS and cache.k.shape[1] == 1 and cache.k.dtype == torch.float32
                and cache.k.is_contiguous() and input_ids.device.type == "cpu")

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, start_pos: int) -> Tensor:
        """x [1, T, hidden]: embeddings of one sequence's tokens at positions start_pos.. -> after the last layer."""
        T = x.shape[1]
        if start_pos + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions, asked to write up to {start_pos + T}")
        slots = torch.arange(start_pos, start_pos + T, dtype=torch.int32)
        return self._run(x, cos, sin, cache, slots, None, slots + 1, start_pos + T)

    def forward_rows(self, x: Tensor, cos: Tensor, sin: Tensor, cache, write_slots: Tensor, read_slots: Tensor,
                     n_read: Tensor) -> Tensor:
        """x [N, hidden]: N tokens (of any sequences) of a paged cache; token i writes slot write_slots[i] and
        attends to read_slots[i, :n_read[i]] (int32). Returns the hidden states after the last layer."""
        if x.shape[0] > MAX_ROWS:
            raise ValueError(f"at most {MAX_ROWS} rows a call, got {x.shape[0]}")
        return self._run(x, cos, sin, cache, write_slots.to(torch.int32).contiguous(),
                         read_slots.to(torch.int32).contiguous(), n_read.to(torch.int32).contiguous(),
                         read_slots.shape[1])

    def _run(self, x, cos, sin, cache, write_slots, read_slots, n_read, s_max) -> Tensor:
        activations = self.model.model.layers[0].self_attn.qkv_proj.activations
        if self._cache_id != (id(cache), cache.k.data_ptr()) or self._activations != activations:
            self._bind(cache)
        self._dims.nthreads = torch.get_num_threads()
        x = x.contiguous().clone()  # updated in place by the C code
        M = x.numel() // x.shape[-1]
        cos, sin = cos.contiguous(), sin.contiguous()
        status = self.lib.qwen_layers_forward(
            x.data_ptr(), M, write_slots.data_ptr(), read_slots.data_ptr() if read_slots is not None else None,
            n_read.data_ptr(), s_max, cos.data_ptr(), sin.data_ptr(), ctypes.byref(self._layers),
            ctypes.byref(self._dims))
        if status:
            raise MemoryError(f"native decoder layers: out of memory for {M} rows")
        return x
