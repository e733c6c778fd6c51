"""`qwen15 train merge`: fold a LoRA adapter into its base and write a model that runs everywhere.

OUT a directory: a Hugging Face checkpoint (config.json, model.safetensors, tokenizer files,
generation_config.json) that transformers loads. OUT ending in `.gguf`: a llama.cpp GGUF (arch qwen2 /
qwen2moe, SPEC §4) written with the `gguf` package's GGUFWriter, matrices in F16, BF16 or Q8_0, 1-D
tensors and MoE routers in F32 (as llama.cpp's converter does), the tokenizer and chat template in its
metadata.

A GGUF base is dequantized to float32 for the merge (memory: 4 bytes a parameter, ~2 GB for the 0.5B,
~6 GB for the 1.5B), whatever it was stored as: the merged weights are new values and get quantized once,
by --type, on the way out.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import Qwen15Error

TYPES = ("f32", "f16", "bf16", "q8_0")
HF_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# What a checkpoint directory may carry besides the weights and config: copied over unchanged.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")
# GGUF token types (llama.cpp's gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


class MergeError(Qwen15Error, ValueError):
    """A merge that cannot run: bad output type or path."""


def merge(model: str | Path | None, adapter: str | Path, out: str | Path, type: str | None = None,
          progress: bool | None = None) -> Path:
    """Merge `adapter` (a PEFT LoRA directory) into `model` and write `out` (HF directory or .gguf file)."""
    from .. import lora
    from ..model import build_model
    from ..tokenizer import Tokenizer
    from ..weights.resolve import resolve_model

    out = Path(out)
    to_gguf = out.suffix.lower() == ".gguf"
    type = (type or ("f16" if to_gguf else "bf16")).lower()
    if type not in TYPES:
        raise MergeError(f"--type {type!r}: expected one of {', '.join(TYPES)}")
    if type == "q8_0" and not to_gguf:
        raise MergeError("--type q8_0 needs a .gguf output (a Hugging Face directory holds f32, f16 or bf16)")
    if out.exists() and (to_gguf and out.is_dir() or not to_gguf and not out.is_dir()):
        raise MergeError(f"{out}: exists and is not a {'file' if to_gguf else 'directory'}")
    if not to_gguf and out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise MergeError(f"{out}: a directory that is not empty and holds no model: expected a new or model directory")
    lora.read_adapter(adapter)  # a bad adapter fails before the (slow) load

    path = resolve_model(None if model is None else str(model))
    if path.is_file():
        from ..weights.gguf import load_gguf

        config, state, metadata = load_gguf(path, dtype=torch.float32, progress=progress)
        tokenizer = Tokenizer.from_gguf_metadata(metadata)
    else:
        from ..weights.safetensors import load_safetensors

        config = ModelConfig.from_hf_config(path)
        state = load_safetensors(path, config, dtype=torch.float32)
        tokenizer, metadata = Tokenizer.from_file(path), None
    net = build_model(config, state)
    del state
    lora.load_adapter(net, adapter)
    lora.merge_lora(net)
    weights = {k: v.detach() for k, v in net.state_dict().items()}
    del net
    name = _base_name(adapter, path)
    if to_gguf:
        write_gguf(out, config, weights, tokenizer, type, name=name, gguf_metadata=metadata)
    else:
        write_hf(out, config, weights, HF_DTYPES[type], tokenizer, source=None if metadata is not None else path)
    return out


def _base_name(adapter: str | Path, base: Path) -> str:
    return f"{base.name.removesuffix('.gguf')}+{Path(adapter).resolve().name}"


# ---- Hugging Face directory ---------------------------------------------------------------------------

def hf_config(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for transformers' Qwen2ForCausalLM / Qwen2MoeForCausalLM."""
    data = {k: v for k, v in config.to_dict().items() if v is not None}
    moe = config.model_type == "qwen2_moe"
    if not moe:
        for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                  "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef"):
            data.pop(k, None)
    dtype_name = str(dtype).removeprefix("torch.")
    data.update(architectures=["Qwen2MoeForCausalLM" if moe else "Qwen2ForCausalLM"], torch_dtype=dtype_name,
                dtype=dtype_name, use_cache=True, attention_dropout=0.0, initializer_range=0.02)
    return data


def _hf_tensors(config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our state dict in checkpoint names: stacked MoE experts become per-expert matrices (as Qwen ships them)."""
    out = {}
    for name, t in weights.items():
        if ".mlp.experts." in name:  # model.layers.i.mlp.experts.gate_proj [E, out, in]
            prefix, proj = name.rsplit(".", 1)
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.{proj}.weight"] = t[e].to(dtype).contiguous()
        else:
            out[name] = t.to(dtype).contiguous()
    return out


def write_hf(out: Path, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype, tokenizer,
             source: Path | None = None) -> Path:
    """config.json, model.safetensors and the tokenizer files (copied from an HF base `source`, else made
    from the tokenizer). Written into a temporary directory beside out, then renamed into place."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp-merge")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(_hf_tensors(config, weights, dtype), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(config, dtype), indent=2) + "\n")
        copied = [f for f in TOKENIZER_FILES if source is not None and (source / f).is_file()]
        for f in copied:
            shutil.copy2(source / f, tmp / f)
        if "tokenizer.json" not in copied:
            _write_hf_tokenizer(tmp, tokenizer, config)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_hf_tokenizer(directory: Path, tokenizer, config: ModelConfig) -> None:
    """tokenizer.json, tokenizer_config.json and generation_config.json from a tokenizer built from GGUF."""
    tok = tokenizer._tok
    tok.save(str(directory / "tokenizer.json"))
    name = tok.id_to_token
    added = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                      "single_word": t.single_word, "special": t.special}
             for i, t in sorted(tok.get_added_tokens_decoder().items())}
    eos = tokenizer.eos_token_ids
    tconfig = {"tokenizer_class": "Qwen2Tokenizer", "model_max_length": config.max_position_embeddings,
               "added_tokens_decoder": added, "bos_token": None, "clean_up_tokenization_spaces": False,
               "eos_token": name(eos[0]) if eos else None, "errors": "replace", "split_special_tokens": False,
               "pad_token": name(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else None}
    if tokenizer.has_own_chat_template:
        tconfig["chat_template"] = tokenizer.chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(tconfig, indent=2, ensure_ascii=False) + "\n")
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id}
    (directory / "generation_config.json").write_text(
        json.dumps({k: v for k, v in generation.items() if v is not None}, indent=2) + "\n")


# ---- GGUF --------------------------------------------------------------------------------------------

def _tokenizer_metadata(tokenizer, config: ModelConfig, gguf_metadata: dict | None) -> dict[str, Any]:
    """The tokenizer.* keys: the base GGUF's own, else built from tokenizer.json as llama.cpp's converter
    does (tokens by id, padded to the embedding rows with [PADn]; special added tokens are control,
    the others user-defined; merges as 'a b')."""
    if gguf_metadata is not None:
        return {k: v for k, v in gguf_metadata.items() if k.startswith("tokenizer.")}
    tok = tokenizer._tok
    vocab = tok.get_vocab(with_added_tokens=True)
    added = tok.get_added_tokens_decoder()
    size = max(config.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    for t, i in vocab.items():
        tokens[i] = t
        types[i] = (CONTROL if added[i].special else USER_DEFINED) if i in added else NORMAL
    merges = json.loads(tok.to_str())["model"].get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    meta: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
                            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
                            "tokenizer.ggml.add_bos_token": False}
    if tokenizer.eos_token_ids:
        meta["tokenizer.ggml.eos_token_id"] = tokenizer.eos_token_ids[0]
    if tokenizer.bos_token_id is not None:
        meta["tokenizer.ggml.bos_token_id"] = tokenizer.bos_token_id
    if tokenizer.pad_token_id is not None:
        meta["tokenizer.ggml.padding_token_id"] = tokenizer.pad_token_id
    if tokenizer.has_own_chat_template:
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    return meta


def _add_tokenizer(w, meta: dict[str, Any]) -> None:
    import gguf

    for key, value in meta.items():
        if key == "tokenizer.ggml.token_type":
            w.add_token_types([int(v) for v in value])
        elif key == "tokenizer.ggml.scores":
            w.add_token_scores([float(v) for v in value])
        elif key.endswith("_token_id"):
            w.add_uint32(key, int(value))
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            w.add_array(key, list(value))
        elif isinstance(value, int):
            w.add_uint32(key, value) if value >= 0 else w.add_int32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, (list, tuple)):
            w.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)


def write_gguf(out: Path, config: ModelConfig, weights: dict[str, torch.Tensor], tokenizer, type: str = "f16",
               name: str = "merged", gguf_metadata: dict | None = None) -> Path:
    """A llama.cpp GGUF of the model (our state-dict names), matrices as `type`; written to a temporary
    name and renamed."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    from ..weights.names import gguf_names

    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[type]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[type]
    arch = "qwen2moe" if config.is_moe else "qwen2"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        w.add_name(name)
        w.add_file_type(int(file_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_block_count(config.num_hidden_layers)
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.num_attention_heads)
        w.add_head_count_kv(config.num_key_value_heads)
        w.add_rope_freq_base(float(config.rope_theta))
        w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        if config.head_dim != config.hidden_size // config.num_attention_heads:
            w.add_key_length(config.head_dim)
            w.add_value_length(config.head_dim)
        if config.is_moe:
            w.add_expert_count(config.num_experts)
            w.add_expert_used_count(config.num_experts_per_tok)
            w.add_expert_feed_forward_length(config.moe_intermediate_size)
            w.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
            w.add_expert_weights_norm(bool(config.norm_topk_prob))
        _add_tokenizer(w, _tokenizer_metadata(tokenizer, config, gguf_metadata))
        for ours, gname in gguf_names(config).items():
            array = weights.pop(ours).to(torch.float32).numpy()
            router = gname.endswith(("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight"))
            if array.ndim < 2 or router:  # llama.cpp keeps norms, biases and routers in F32
                w.add_tensor(gname, np.ascontiguousarray(array))
                continue
            t = qtype if (qtype != Q.Q8_0 or array.shape[-1] % 32 == 0) else Q.F16  # Q8_0 needs rows of 32
            if t == Q.F32:
                w.add_tensor(gname, np.ascontiguousarray(array))
            elif t == Q.F16:
                w.add_tensor(gname, array.astype(np.float16))
            else:
                data = gguf.quants.quantize(array, t)
                w.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def cmd_merge(args) -> int:
    out = merge(args.model, args.adapter, args.out, type=args.type)
    print(out)
    return 0
