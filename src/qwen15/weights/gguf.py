"""GGUF files (llama.cpp): metadata, config and tensors, read through the `gguf` package by mmap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import torch

from ..errors import WeightsError


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """Open a GGUF file by mmap; a missing or non-GGUF file raises WeightsError naming it."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise WeightsError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on truncated files
        raise WeightsError(f"{path}: corrupt or truncated GGUF ({type(e).__name__}: {e})") from None


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All key/value metadata as plain Python values (str, int, float, bool, lists of those)."""
    meta: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        meta[name] = field.contents()
    return meta


ARCHITECTURES = ("qwen2", "qwen2moe")


def config_from_gguf(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]], path: str | Path = "GGUF"):
    """A ModelConfig from GGUF metadata; vocab size and tied embeddings are read off the tensors."""
    from ..config import ModelConfig

    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise WeightsError(f"{path}: unknown architecture {arch!r}: expected qwen2 or qwen2moe")

    def key(name: str, default: Any = None, required: bool = True) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None and required:
            raise WeightsError(f"{path}: missing metadata '{arch}.{name}'")
        return value

    if "token_embd.weight" not in tensor_shapes:
        raise WeightsError(f"{path}: missing tensor 'token_embd.weight'")
    heads = int(key("attention.head_count"))
    fields: dict[str, Any] = dict(
        model_type="qwen2_moe" if arch == "qwen2moe" else "qwen2",
        vocab_size=int(tensor_shapes["token_embd.weight"][0]),
        hidden_size=int(key("embedding_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(key("attention.head_count_kv", heads)),
        max_position_embeddings=int(key("context_length", 32768)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in tensor_shapes,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
    )
    if arch == "qwen2moe":
        fields.update(
            num_experts=int(key("expert_count")), num_experts_per_tok=int(key("expert_used_count")),
            moe_intermediate_size=int(key("expert_feed_forward_length")),
            shared_expert_intermediate_size=int(key("expert_shared_feed_forward_length", 0, required=False)),
            intermediate_size=int(key("feed_forward_length", 0, required=False) or
                                  key("expert_shared_feed_forward_length", 0, required=False)),
        )
    else:
        fields["intermediate_size"] = int(key("feed_forward_length"))
    try:
        return ModelConfig(**fields)
    except Exception as e:
        raise WeightsError(f"{path}: metadata does not describe a valid model: {e}") from None


def _torch_shape(tensor) -> tuple[int, ...]:
    # GGUF lists dims innermost first (ne[0] is the row length); torch wants them outermost first.
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, progress: bool | None = None):
    """Read a qwen2 / qwen2moe GGUF: (config, state dict in our names, dequantized to dtype, metadata)."""
    import sys

    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize
    from tqdm import tqdm

    from .names import expected_shapes, gguf_name_map

    path = Path(path)
    reader = open_gguf(path)
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    config = config_from_gguf(meta, {n: _torch_shape(t) for n, t in tensors.items()}, path)
    names = gguf_name_map(config.num_hidden_layers)
    shapes = expected_shapes(config)
    wanted = {ours: g for g, ours in names.items() if ours in shapes}
    missing = [g for ours, g in wanted.items() if g not in tensors]
    if missing:
        raise WeightsError(f"{path}: missing tensor '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    state: dict[str, torch.Tensor] = {}
    show = sys.stderr.isatty() if progress is None else progress
    for ours, gname in tqdm(wanted.items(), desc="loading", unit="tensor", disable=not show):
        t = tensors[gname]
        shape = _torch_shape(t)
        if shape != shapes[ours]:
            raise WeightsError(f"{path}: tensor '{gname}' has shape {shape} but the config implies {shapes[ours]}")
        if t.data.nbytes < _expected_nbytes(t):
            raise WeightsError(f"{path}: truncated: tensor '{gname}' has {t.data.nbytes} of {_expected_nbytes(t)} bytes")
        if t.tensor_type in (Q.F32, Q.F16):
            array = np.array(t.data)  # a copy: the mmap is read-only
        else:
            array = dequantize(t.data, t.tensor_type)
        state[ours] = torch.from_numpy(np.ascontiguousarray(array).reshape(shape)).to(dtype)
    return config, state, meta


def _expected_nbytes(tensor) -> int:
    from gguf import GGML_QUANT_SIZES

    block, type_size = GGML_QUANT_SIZES[tensor.tensor_type]
    return int(tensor.n_elements) // block * type_size

