"""Choosing the next token: penalties, temperature, top-k, top-p, min-p, then greedy or seeded sampling.

The order is transformers' (penalties, temperature, top-k, top-p, min-p); each step is a small function
that takes and returns float32 logits [B, V] with removed tokens at -inf, so each can be tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from ..errors import GenerationError


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None  # None: the model's eos ids
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def chat_defaults(cls, **overrides) -> "SamplingParams":
        """Qwen's recommended chat sampling (SPEC section 3)."""
        return cls(**{"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, **overrides})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        def bad(name: str, expected: str) -> GenerationError:
            return GenerationError(f"{name} must be {expected}, got {getattr(self, name)!r}")

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(name, "a number")
            return float(value)

        if number("temperature") < 0:
            raise bad("temperature", ">= 0")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0")
        if not 0 < number("top_p") <= 1:
            raise bad("top_p", "in (0, 1]")
        if not 0 <= number("min_p") <= 1:
            raise bad("min_p", "in [0, 1]")
        if number("repetition_penalty") <= 0:
            raise bad("repetition_penalty", "> 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= number(name) <= 2:
                raise bad(name, "in [-2, 2]")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise bad("max_tokens", "an integer >= 0")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad("seed", "an integer")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise bad("stop", "a list of strings")
        if self.stop_token_ids is not None and not all(isinstance(t, int) for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of token ids")


# ---- logits transforms: float32 [B, V] in, float32 [B, V] out -----------------------------------
def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """transformers' rule on every token already in prompt or output: logit<0 -> *penalty, else /penalty.

    seen: bool [B, V].
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(logits: Tensor, counts: Tensor, presence: float, frequency: float) -> Tensor:
    """OpenAI's rule over generated tokens: logit - presence * [count > 0] - frequency * count."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts.to(logits.dtype)


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    return logits if temperature in (0.0, 1.0) else logits / temperature


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (always the top one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped when the tokens before it already reach p.
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below min_p times that of the most likely token."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def log_softmax_topk(logits: Tensor, chosen: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probabilities of the chosen tokens [B], and the top-k ids and log-probs [B, k]."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logprobs, k, dim=-1) if k > 0 else None
    chosen_lp = logprobs.gather(-1, chosen.view(-1, 1)).squeeze(-1)
    if top is None:
        empty = logprobs.new_empty(logprobs.shape[0], 0)
        return chosen_lp, empty.long(), empty
    return chosen_lp, top.indices, top.values


class Sampler:
    """Turns next-token logits into token ids under one SamplingParams, with its own seeded generator."""

    def __init__(self, params: SamplingParams, device: str | torch.device = "cpu"):
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def process(self, logits: Tensor, prompt: Sequence[Sequence[int]] | None = None,
                generated: Sequence[Sequence[int]] | None = None) -> Tensor:
        """All transforms in order, returning float32 logits [B, V] (removed tokens at -inf)."""
        p = self.params
        logits = logits.float()
        B, V = logits.shape
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(B, V, dtype=torch.bool, device=logits.device)
            for row in range(B):
                ids = list(prompt[row] if prompt else []) + list(generated[row] if generated else [])
                if ids:
                    seen[row, torch.tensor(ids, device=logits.device)] = True
            logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and generated:
            counts = torch.zeros(B, V, device=logits.device)
            for row in range(B):
                if generated[row]:
                    ids = torch.tensor(list(generated[row]), device=logits.device)
                    counts[row].index_add_(0, ids, torch.ones(len(ids), device=logits.device))
            logits = apply_presence_frequency(logits, counts, p.presence_penalty, p.frequency_penalty)
        if p.greedy:
            return logits
        logits = apply_temperature(logits, p.temperature)
        logits = apply_top_k(logits, p.top_k)
        logits = apply_top_p(logits, p.top_p)
        return apply_min_p(logits, p.min_p)

    def sample(self, logits: Tensor, prompt: Sequence[int] | Sequence[Sequence[int]] | None = None,
               generated: Sequence[int] | Sequence[Sequence[int]] | None = None) -> Tensor:
        """Next token ids [B] for logits [B, V]; prompt/generated are the ids so far (one list per row)."""
        prompt, generated = _rows(prompt, logits.shape[0]), _rows(generated, logits.shape[0])
        logits = self.process(logits, prompt, generated)
        if self.params.greedy:
            return logits.argmax(dim=-1)
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


def _rows(ids, batch: int):
    """Accept one flat list for a batch of one, or one list per row."""
    if ids is None:
        return None
    ids = list(ids)
    if batch == 1 and (not ids or isinstance(ids[0], int)):
        return [ids]
    return ids
