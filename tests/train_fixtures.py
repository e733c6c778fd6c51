"""A tiny random Hugging Face model directory with a byte-level tokenizer and the ChatML template, for
training tests: 259 tokens (256 bytes + <|endoftext|>, <|im_start|>, <|im_end|>), hidden 64, 2 layers, GQA 4/2.

Small enough that a training step takes milliseconds; a real directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json) so that `--model DIR`, transformers and PEFT all load it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from gguf_fixtures import random_state_dict, tiny_config

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def write_tiny_tokenizer(directory: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.save(str(directory / "tokenizer.json"))
    from qwen15.tokenizer import CHATML_TEMPLATE

    (directory / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML_TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "model_max_length": 512}))


def write_tiny_model(directory: Path, seed: int = 0, tied: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_config(vocab_size=259, tie_word_embeddings=tied, bos_token_id=None, eos_token_id=258,
                         max_position_embeddings=512)
    state = random_state_dict(config, seed=seed)
    state = {k: (v * 0.2 if v.dim() == 2 else v) for k, v in state.items()}  # modest logits: losses ~ ln(vocab)
    data = {k: v for k, v in config.to_dict().items() if v is not None}
    data["architectures"] = ["Qwen2ForCausalLM"]
    data["torch_dtype"] = "float32"
    (directory / "config.json").write_text(json.dumps(data))
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"), metadata={"format": "pt"})
    write_tiny_tokenizer(directory)
    return directory


def write_chat_data(path: Path, n: int, start: int = 0) -> Path:
    with open(path, "w") as f:
        for i in range(start, start + n):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}) + "\n")
    return path


def hf_model(directory: Path):
    """transformers' Qwen2ForCausalLM on the same directory, float32, eval mode: the reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), torch_dtype=torch.float32).eval()
