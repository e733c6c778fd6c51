"""A tiny random qwen2 GGUF that carries the real Qwen2.5 tokenizer and chat template, for fast server tests.

The weights are random (2 layers, hidden 64, GQA 4/2), so generation is fast and its text is nonsense;
the tokenizer, special tokens and chat template are the real checkpoint's, so prompts, stop ids, tool
templates and detokenizing behave as with the real model.
"""

from __future__ import annotations

from pathlib import Path

from gguf_fixtures import random_state_dict, tiny_config, write_tiny_gguf

TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                  "tokenizer.ggml.bos_token_id", "tokenizer.chat_template")


def write_tiny_chat_gguf(path: Path, real_gguf: Path, context: int = 2048, seed: int = 0) -> Path:
    from qwen15.weights.gguf import open_gguf, read_metadata

    meta = read_metadata(open_gguf(real_gguf))
    config = tiny_config(vocab_size=len(meta["tokenizer.ggml.tokens"]), max_position_embeddings=context,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, rope_theta=1e6)
    state = random_state_dict(config, seed=seed)
    state["model.embed_tokens.weight"] *= 4  # peaked logits: greedy ties (and fp-order flips) are unlikely
    write_tiny_gguf(path, config, state, metadata={k: meta[k] for k in TOKENIZER_KEYS if k in meta})
    return path
