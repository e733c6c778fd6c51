"""Speculative decoding keeps the target's greedy output exactly, whatever the draft proposes."""

import json
import subprocess
import sys

import pytest

from qwen15.config import ModelConfig
from qwen15.errors import GenerationError
from qwen15.model import build_model
from qwen15.tokenizer import Tokenizer

pytestmark = pytest.mark.real_model

PROMPTS = ["def fibonacci(n):", [{"role": "user", "content": "用一句话介绍一下北京。"}]]


@pytest.fixture(scope="module")
def target(real_gguf_path):
    from qwen15 import LLM

    return LLM.load(real_gguf_path)


def random_draft(target, layers=2, seed=0):
    """A tiny random model sharing the target's tokenizer: it proposes mostly wrong tokens."""
    import torch

    from qwen15 import LLM

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=target.config.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=True)
    return LLM(build_model(cfg), target.tokenizer, name="random-draft")


@pytest.mark.parametrize("prompt", PROMPTS, ids=["raw", "chat"])
@pytest.mark.parametrize("draft_kind,k", [("self", 4), ("random", 3), ("self", 1)])
def test_output_identical_to_plain_greedy(target, prompt, draft_kind, k):
    target.draft = None
    plain = target.generate(prompt, max_tokens=40, temperature=0.0)
    target.attach_draft(target if draft_kind == "self" else random_draft(target), tokens=k)
    try:
        spec = target.generate(prompt, max_tokens=40, temperature=0.0)
    finally:
        target.draft = None
    assert spec.token_ids == plain.token_ids
    assert spec.text == plain.text and spec.finish_reason == plain.finish_reason
    assert spec.drafted > 0
    if draft_kind == "self":  # a draft that is the target is always right
        assert spec.acceptance_rate == 1.0
    else:
        assert spec.acceptance_rate < 0.5


def test_sampled_requests_ignore_the_draft(target):
    target.attach_draft(random_draft(target))
    try:
        result = target.generate("def add(a, b):", max_tokens=8, temperature=0.8, seed=3)
    finally:
        target.draft = None
    assert result.drafted == 0 and len(result.token_ids) == 8


def test_incompatible_draft_is_refused(target):
    from qwen15 import LLM

    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.token_type": [1, 1, 1]}
    cfg = ModelConfig(vocab_size=3, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    other = LLM(build_model(cfg), Tokenizer.from_gguf_metadata(meta), name="other")
    with pytest.raises(GenerationError, match="cannot draft for .*tokenizer differs"):
        target.attach_draft(other)


def test_cli_draft_reports_acceptance(real_gguf_path):
    out = subprocess.run(
        [sys.executable, "-m", "qwen15.cli", "generate", "--model", str(real_gguf_path), "--draft",
         str(real_gguf_path), "--prompt", "def fibonacci(n):", "--max-tokens", "12", "--temperature", "0",
         "--json", "--threads", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["acceptance_rate"] == 1.0 and len(row["token_ids"]) == 12
