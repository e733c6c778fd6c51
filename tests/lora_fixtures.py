"""A tiny qwen2 GGUF with a small byte-level BPE vocabulary (ChatML specials, a user-defined token, padding
rows) for adapter tests: fast to write, quantize and load, unlike the real 151,936-token vocabulary. And
the same weights as transformers' Qwen2ForCausalLM, plus PEFT adapters made by PEFT itself."""

from __future__ import annotations

from pathlib import Path

import torch
from gguf import GGMLQuantizationType as Q
from gguf_fixtures import random_state_dict, tiny_config, write_tiny_gguf
from tokenizers import pre_tokenizers

from qwen15.tokenizer import CHATML_TEMPLATE

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "u"), ("Ġ", "a")]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def small_vocab_metadata(pad_to: int = 288) -> dict:
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens += ["".join(m) for m in MERGES]
    types = [1] * len(tokens)
    tokens += SPECIALS + ["<tool_call>"]
    types += [3] * len(SPECIALS) + [4]
    while len(tokens) < pad_to:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(5)
    ids = {t: i for i, t in enumerate(tokens)}
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": [" ".join(m) for m in MERGES],
            "tokenizer.ggml.eos_token_id": ids["<|im_end|>"], "tokenizer.ggml.padding_token_id": ids["<|endoftext|>"],
            "tokenizer.ggml.bos_token_id": ids["<|endoftext|>"], "tokenizer.chat_template": CHATML_TEMPLATE}


def write_small_chat_gguf(path: Path, qtype=Q.F32, seed: int = 0) -> Path:
    meta = small_vocab_metadata()
    config = tiny_config(vocab_size=len(meta["tokenizer.ggml.tokens"]), max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    state = random_state_dict(config, seed=seed)
    state["model.embed_tokens.weight"] *= 4  # peaked logits: greedy ties are unlikely
    write_tiny_gguf(path, config, state, qtype, metadata=meta)
    return path


def hf_from_gguf(path: Path):
    """transformers' Qwen2ForCausalLM holding the GGUF's values (dequantized by the gguf package)."""
    import gguf
    import numpy as np
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen15.weights.gguf import config_from_gguf, read_metadata
    from qwen15.weights.names import gguf_name_map

    reader = gguf.GGUFReader(path)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    c = config_from_gguf(read_metadata(reader), shapes, path)
    hf = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings))
    names = gguf_name_map(c.num_hidden_layers)
    state = {names[t.name]: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
                                             .reshape(shapes[t.name])) for t in reader.tensors}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf.float().eval()


def make_peft_adapter(hf, out: Path, targets=ALL_TARGETS, r: int = 4, alpha: float = 8, seed: int = 0,
                      std: float = 0.3, **kwargs):
    """A LoRA adapter made by PEFT on hf (random nonzero A and B), saved to out; returns the PeftModel.
    PEFT injects into hf in place: pass a model you do not need without the adapter."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(hf, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    pm.eval()
    pm.save_pretrained(out)
    return pm
