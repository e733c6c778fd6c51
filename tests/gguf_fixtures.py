"""Tiny qwen2 / qwen2moe GGUF files for tests, written with gguf.GGUFWriter (the llama.cpp package).

`write_tiny_gguf(path, config, state_dict, qtype=...)` takes a ModelConfig and a state dict in our names
(see qwen15.weights.names.expected_shapes) and writes the file llama.cpp's converter would: metadata
`{arch}.*`, tensors under GGUF names with dims reversed, 1-D tensors (norms, biases) and the MoE
router in F32, matrices in `qtype`.

Where gguf has a numpy quantizer (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) the state dict's
values are quantized. The K-quants (Q2_K ... Q6_K) have none: those tensors get random but valid blocks
(finite scales), so their values are NOT the state dict's. Either way the function returns what the
file holds, dequantized with gguf.quants.dequantize, in our names and torch shapes: the reference a
loader must reproduce.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from qwen15.config import ModelConfig
from qwen15.weights.names import gguf_names

# Byte offsets of the float16 scale fields inside one K-quant block (see ggml-common.h block_qN_K).
_K_QUANT_F16_OFFSETS = {
    Q.Q2_K: (80, 82),   # scales[16], qs[64], d, dmin
    Q.Q3_K: (108,),     # hmask[32], qs[64], scales[12], d
    Q.Q4_K: (0, 2),     # d, dmin, scales[12], qs[128]
    Q.Q5_K: (0, 2),     # d, dmin, scales[12], qh[32], qs[128]
    Q.Q6_K: (208,),     # ql[128], qh[64], scales[16], d
}
K_QUANTS = tuple(_K_QUANT_F16_OFFSETS)


def tiny_config(moe: bool = False, **overrides: Any) -> ModelConfig:
    """A small random-test config (hidden 64, 2 layers, GQA 4/2, untied); MoE with 4 experts, top 2."""
    fields: dict[str, Any] = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                                  bos_token_id=1, eos_token_id=2)
    if moe:
        fields.update(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, intermediate_size=64)
    fields.update(overrides)
    return ModelConfig(**fields)


def random_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 tensors for every name/shape the config implies (norm weights around 1)."""
    from qwen15.weights.names import expected_shapes

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(config).items():
        t = torch.randn(shape, generator=g) * 0.5
        if name.endswith("norm.weight"):
            t = t + 1.0
        out[name] = t
    return out


def _random_k_blocks(n_blocks: int, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in _K_QUANT_F16_OFFSETS[qtype]:
        scale = rng.uniform(1e-4, 2e-3, size=n_blocks).astype(np.float16)
        blocks[:, off:off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def encode(array: np.ndarray, qtype: Q, rng: np.random.Generator | None = None) -> np.ndarray:
    """The bytes (or plain array) GGUFWriter.add_tensor takes for `array` stored as `qtype`."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    if qtype == Q.F32:
        return array
    if qtype == Q.F16:
        return array.astype(np.float16)
    if qtype in _K_QUANT_F16_OFFSETS:
        block, type_size = GGML_QUANT_SIZES[qtype]
        rng = rng if rng is not None else np.random.default_rng(0)
        n_blocks = array.size // block
        return _random_k_blocks(n_blocks, qtype, rng).reshape(*array.shape[:-1], array.shape[-1] // block * type_size)
    return gguf.quants.quantize(array, qtype)


def _storage_type(name: str, array: np.ndarray, qtype: Q, overrides: Mapping[str, Q]) -> Q:
    if name in overrides:
        return overrides[name]
    # llama.cpp keeps 1-D tensors and the MoE routers in F32.
    if array.ndim < 2 or name.endswith("ffn_gate_inp.weight") or name.endswith("ffn_gate_inp_shexp.weight"):
        return Q.F32
    block, _ = GGML_QUANT_SIZES[qtype]
    return qtype if array.shape[-1] % block == 0 else Q.F32


def write_tiny_gguf(path: str | Path, config: ModelConfig, state_dict: Mapping[str, torch.Tensor],
                    qtype: Q = Q.F32, *, qtypes: Mapping[str, Q] | None = None,
                    metadata: Mapping[str, Any] | None = None, skip: tuple[str, ...] = (),
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Write `state_dict` (our names) as a qwen2 / qwen2moe GGUF at `path`.

    qtype: storage type of the matrices (rows not a whole number of blocks fall back to F32);
    qtypes: per-GGUF-name overrides (e.g. {"output.weight": Q.Q6_K}); metadata: extra keys, e.g. a
    tokenizer section ({"tokenizer.ggml.model": "gpt2", ...}: str, int, float, bool, lists of those;
    ints are written as uint32, or int32 if negative); skip: GGUF names to leave out (for
    missing-tensor tests). The tied/untied choice follows config.tie_word_embeddings (no
    `output.weight` when tied). Returns the stored values dequantized, in our names and torch shapes.
    """
    path = Path(path)
    arch = "qwen2moe" if config.is_moe else "qwen2"
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    if config.head_dim != config.hidden_size // config.num_attention_heads:
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
    if config.is_moe:
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    if config.bos_token_id is not None:
        w.add_bos_token_id(config.bos_token_id)
    if config.eos_token_ids:
        w.add_eos_token_id(config.eos_token_ids[0])
    for key, value in (metadata or {}).items():
        _add_metadata(w, key, value)

    stored: dict[str, torch.Tensor] = {}
    for ours, gname in gguf_names(config).items():
        if gname in skip:
            continue
        array = state_dict[ours].detach().to(torch.float32).numpy()
        ttype = _storage_type(gname, array, qtype, qtypes or {})
        data = encode(array, ttype, rng)
        if ttype in (Q.F32, Q.F16):
            w.add_tensor(gname, data)
        else:
            w.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=ttype)
        back = gguf.quants.dequantize(data, ttype)
        stored[ours] = torch.from_numpy(np.array(back, dtype=np.float32)).reshape(array.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def _add_metadata(w: gguf.GGUFWriter, key: str, value: Any) -> None:
    V = gguf.GGUFValueType
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        (w.add_int32 if value < 0 else w.add_uint32)(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            w.add_key_value(key, list(value), V.ARRAY, sub_type=V.INT32)
        else:
            w.add_array(key, list(value))
    else:
        raise TypeError(f"cannot write metadata {key!r} of type {type(value).__name__}")
