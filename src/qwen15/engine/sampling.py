"""Choosing the next token: penalties, temperature, top-k, top-p, min-p, then greedy or seeded sampling.

The order is transformers' generate(): repetition penalty, presence/frequency penalties, then (unless
greedy) temperature, top-k, top-p, min-p, softmax in float32 and torch.multinomial. Each step is a small
function taking and returning float32 logits [B, V] with removed tokens at -inf, so each can be tested
alone against transformers' own processors.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from itertools import chain
from typing import Sequence, Union

import torch
from torch import Tensor

from ..errors import GenerationError

NEG_INF = float("-inf")

# The ids seen so far: one list per row (a flat list is accepted for a batch of one), or a long tensor
# [B, L] (or [L] for a batch of one) in which negative ids are padding and are ignored.
TokenIds = Union[Sequence[int], Sequence[Sequence[int]], Tensor, None]


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; transformers' rule, over prompt and output
    presence_penalty: float = 0.0  # OpenAI's rule, over the output only
    frequency_penalty: float = 0.0  # OpenAI's rule, over the output only
    seed: int | None = None  # None: a fresh random seed (see Sampler.seed)
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)  # stop strings (a single string is accepted)
    stop_token_ids: list[int] | None = None  # None: the model's eos ids
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def chat_defaults(cls, **overrides) -> "SamplingParams":
        """Qwen's recommended chat sampling (SPEC section 3): temperature 0.7, top_p 0.8, top_k 20, rep. 1.05."""
        return cls(**{"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, **overrides})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise GenerationError (one line: name, bad value, what was expected) for any out-of-range field."""

        def bad(name: str, expected: str) -> GenerationError:
            return GenerationError(f"{name} must be {expected}, got {getattr(self, name)!r}")

        def number(name: str, expected: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, expected)
            return float(value)

        def integer(name: str, expected: str) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(name, expected)
            return value

        if not number("temperature", ">= 0") >= 0:
            raise bad("temperature", ">= 0")
        if integer("top_k", "an integer >= 0") < 0:
            raise bad("top_k", "an integer >= 0")
        if not 0 < number("top_p", "in (0, 1]") <= 1:
            raise bad("top_p", "in (0, 1]")
        if not 0 <= number("min_p", "in [0, 1]") <= 1:
            raise bad("min_p", "in [0, 1]")
        if not number("repetition_penalty", "> 0") > 0:
            raise bad("repetition_penalty", "> 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= number(name, "in [-2, 2]") <= 2:
                raise bad(name, "in [-2, 2]")
        if integer("max_tokens", "an integer >= 0") < 0:
            raise bad("max_tokens", "an integer >= 0")
        if self.seed is not None and not -(2**63) <= integer("seed", "an integer or None") < 2**64:
            raise bad("seed", "an integer in [-2**63, 2**64) or None")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "a list of non-empty strings")
        if self.stop_token_ids is not None and not (
                isinstance(self.stop_token_ids, list)
                and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids)):
            raise bad("stop_token_ids", "a list of token ids (integers >= 0) or None")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "True or False")


# ---- which tokens were seen: (row, id) pairs and [B, V] counts --------------------------------------
def _rows(ids: TokenIds, batch: int, name: str) -> Tensor | list[list[int]] | None:
    """Normalise to a long tensor [B, L] or one list per row; a flat list/1-D tensor is a batch of one."""
    if ids is None:
        return None
    if isinstance(ids, Tensor):
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.shape[0] != batch:
            raise ValueError(f"{name} must be a [{batch}, L] tensor of token ids, got shape {tuple(ids.shape)}")
        return ids.long()
    ids = list(ids)
    if ids and not hasattr(ids[0], "__len__"):  # a flat list of ints (or numpy ints)
        ids = [ids]
    elif not ids and batch == 1:
        ids = [[]]
    if len(ids) != batch:
        raise ValueError(f"{name} must have one list of token ids per row ({batch}), got {len(ids)}")
    return ids


def _flat(ids: Tensor | list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """(row index, token id) pairs of every id, as two long tensors."""
    if isinstance(ids, Tensor):
        rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(ids)
        return rows.reshape(-1).to(device), ids.reshape(-1).to(device)
    lengths = torch.tensor([len(r) for r in ids], dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(ids)), lengths)
    return rows.to(device), torch.tensor(list(chain.from_iterable(ids)), dtype=torch.long).to(device)


def _valid_pairs(ids: TokenIds, batch: int, vocab: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(row, token) pairs of every id in 0 <= id < vocab (others are padding or cannot be generated)."""
    rows, tokens = _flat(_rows(ids, batch, "ids"), device)
    keep = (tokens >= 0) & (tokens < vocab)
    return rows[keep], tokens[keep]


def token_counts(ids: TokenIds, batch: int, vocab: int, device: torch.device | str = "cpu") -> Tensor:
    """How often each token occurs in each row: float32 [B, V]. Negative ids and ids >= V are ignored."""
    counts = torch.zeros(batch, vocab, dtype=torch.float32, device=device)
    if ids is None:
        return counts
    rows, tokens = _valid_pairs(ids, batch, vocab, torch.device(device))
    return counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.float32), accumulate=True)


# ---- logits transforms: float32 [B, V] in, float32 [B, V] out -----------------------------------
def apply_repetition_penalty(logits: Tensor, ids: TokenIds, penalty: float) -> Tensor:
    """transformers' rule on every token already seen (ids: prompt + output): logit<0 -> *penalty, else /penalty.

    Works on the seen ids only (gather, penalise, scatter), so it costs O(ids), not O(vocab).
    """
    if penalty == 1.0 or ids is None:
        return logits
    return _repetition_penalty(logits, *_valid_pairs(ids, *logits.shape, logits.device), penalty)


def _repetition_penalty(logits: Tensor, rows: Tensor, tokens: Tensor, penalty: float) -> Tensor:
    if tokens.numel() == 0:
        return logits
    seen = logits[rows, tokens]
    penalised = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.index_put((rows, tokens), penalised)  # out of place; duplicates write the same value


def apply_presence_frequency(logits: Tensor, counts: Tensor, presence: float, frequency: float) -> Tensor:
    """OpenAI's rule over generated tokens: logit - presence * [count > 0] - frequency * count."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    counts = counts.to(logits.dtype)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Divide by the temperature (> 0; 0 means greedy and leaves the logits alone)."""
    return logits if temperature in (0.0, 1.0) else logits / temperature


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits (and any tied with the k-th); k <= 0 is off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus: drop the least likely tokens whose total probability is <= 1 - p; the top token always stays.

    transformers' rule; tokens tied with the least likely kept one are kept too (transformers' unstable
    sort keeps an arbitrary subset of them), so the result does not depend on the order of ties.
    """
    if p >= 1.0:
        return logits
    sorted_logits = torch.sort(logits, dim=-1, descending=False).values
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - p)
    drop_sorted[..., -1] = False
    return _drop_below(logits, sorted_logits, drop_sorted)


def _drop_below(logits: Tensor, sorted_logits: Tensor, drop_sorted: Tensor) -> Tensor:
    """Mask every logit below the smallest one kept in the sorted view (so ties with it stay)."""
    threshold = sorted_logits.masked_fill(drop_sorted, float("inf")).amin(dim=-1, keepdim=True)
    return logits.masked_fill(logits < threshold, NEG_INF)


def apply_min_p(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below min_p times that of the most likely token (which stays)."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    drop = (probs < threshold).scatter(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(drop, NEG_INF)


def log_softmax_topk(logits: Tensor, chosen: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probabilities (float32) of the chosen tokens [B], and the k most likely ids [B, k] and log-probs [B, k].

    Pass the logits the probabilities should describe (e.g. the raw model logits, or Sampler.process()'s).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen_lp = logprobs.gather(-1, chosen.to(logprobs.device).long().view(-1, 1)).squeeze(-1)
    k = max(0, min(int(k), logprobs.shape[-1]))
    top = torch.topk(logprobs, k, dim=-1)
    return chosen_lp, top.indices, top.values


def _draw(probs: Tensor, generator: torch.Generator) -> Tensor:
    """One index per row with probability probs[row, index] (probs >= 0, any scale): long [B, 1].

    Inverse CDF with one uniform per row from the generator: the same distribution as
    torch.multinomial(probs, 1), but ~30x cheaper on CPU for a 152k vocab (multinomial draws one
    exponential per vocab entry).
    """
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=probs.dtype)
    return _inverse_cdf(probs, u)


def _inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """The index where the CDF first exceeds u * total, for u in [0, 1) per row: long [B, 1].

    A zero-probability entry is never chosen: the CDF is flat across it, and the result is capped at the
    last entry with probability > 0 in case u * total rounds up to the total.
    """
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    picked = torch.searchsorted(cdf, u * total, right=True)
    return torch.minimum(picked, torch.searchsorted(cdf, total, right=False))


# Candidate counts tried before sorting the whole vocab for top-p alone (a full sort of 152k is ~10 ms on CPU).
_TOP_P_CANDIDATES = (256, 4096)
# Slack on "the candidates hold at least p of the mass" for float error in exp/sum over the vocab.
_TOP_P_SLACK = 1e-4


class Sampler:
    """Turns next-token logits into token ids under one SamplingParams, with its own seeded generator.

    The same seed gives the same tokens (on the same device); seed None draws a fresh one, kept in .seed.
    """

    def __init__(self, params: SamplingParams, device: str | torch.device | None = None):
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._generators: dict[torch.device, torch.Generator] = {}
        if device is not None:
            self.generator_for(torch.device(device))

    def generator_for(self, device: torch.device) -> torch.Generator:
        """The generator on the logits' device, seeded on first use (random draws need one on that device)."""
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
            gen.manual_seed(self.seed)
        return gen

    @property
    def generator(self) -> torch.Generator:
        return self.generator_for(torch.device("cpu"))

    def penalise(self, logits: Tensor, prompt: TokenIds = None, generated: TokenIds = None) -> Tensor:
        """Float32 logits after the repetition penalty (prompt + generated) and presence/frequency (generated)."""
        p = self.params
        logits = logits.float()
        B, V = logits.shape
        if p.repetition_penalty != 1.0 and (prompt is not None or generated is not None):
            pairs = [_valid_pairs(ids, B, V, logits.device) for ids in (prompt, generated) if ids is not None]
            rows, tokens = torch.cat([r for r, _ in pairs]), torch.cat([t for _, t in pairs])
            logits = _repetition_penalty(logits, rows, tokens, p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and generated is not None:
            counts = token_counts(generated, B, V, logits.device)
            logits = apply_presence_frequency(logits, counts, p.presence_penalty, p.frequency_penalty)
        return logits

    def process(self, logits: Tensor, prompt: TokenIds = None, generated: TokenIds = None) -> Tensor:
        """All transforms in order over the whole vocab: float32 logits [B, V], removed tokens at -inf.

        The reference for sample(): sample() draws from softmax(process(...)) (or takes its argmax when greedy).
        """
        p = self.params
        logits = self.penalise(logits, prompt, generated)
        if p.greedy:
            return logits
        logits = apply_temperature(logits, p.temperature)
        logits = apply_top_k(logits, p.top_k)
        logits = apply_top_p(logits, p.top_p)
        return apply_min_p(logits, p.min_p)

    @torch.no_grad()
    def sample(self, logits: Tensor, prompt: TokenIds = None, generated: TokenIds = None) -> Tensor:
        """Next token ids (long [B]) for logits [B, V] of any float dtype.

        prompt / generated: the ids so far, one list per row (a flat list for a batch of one) or a long
        tensor [B, L] padded with negative ids. The repetition penalty sees both; presence/frequency
        penalties only the generated ones.
        """
        if logits.dim() != 2:
            raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
        p = self.params
        logits = self.penalise(logits, prompt, generated)
        if p.greedy:
            return logits.argmax(dim=-1)
        logits = apply_temperature(logits, p.temperature)
        values, ids = self._candidates(logits)
        choice = _draw(values.softmax(dim=-1), self.generator_for(logits.device))
        return (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)

    def _candidates(self, logits: Tensor) -> tuple[Tensor, Tensor | None]:
        """(logits after top-k/top-p/min-p, their vocab ids): [B, C] and [B, C], or [B, V] and None.

        Same result as process()'s transforms, but when top-k or top-p leaves few tokens they are
        worked on as a small sorted [B, C] slice instead of sorting the whole vocab.
        """
        p = self.params
        V = logits.shape[-1]
        if 0 < p.top_k < V:
            values, ids = torch.topk(logits, p.top_k, dim=-1)
            # top-k keeps every token tied with the k-th logit (common with bf16 logits): widen to include them.
            kept = int((logits >= values[:, -1:]).sum(dim=-1).max())
            if kept > p.top_k:
                values, ids = torch.topk(logits, kept, dim=-1)
                values = apply_top_k(values, p.top_k)
            # top-p after top-k renormalises over the survivors, exactly as on the masked vocab.
            return apply_min_p(apply_top_p(values, p.top_p), p.min_p), ids
        if p.top_p < 1.0:
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            for c in _TOP_P_CANDIDATES:
                if c >= V:
                    break
                values, ids = torch.topk(logits, c, dim=-1)
                probs = (values - lse).exp()
                # Every token outside the candidates has at least the candidates strictly above the last
                # one's logit above it; when those hold p of the mass, top-p drops every outside token.
                above = probs.masked_fill(values == values[:, -1:], 0.0).sum(dim=-1)
                if bool((above >= p.top_p + _TOP_P_SLACK).all()):
                    # Inside, drop a token when the mass above it (over the whole vocab) reaches p.
                    drop = (probs.cumsum(dim=-1) - probs) >= p.top_p
                    drop[:, 0] = False
                    return apply_min_p(_drop_below(values, values, drop), p.min_p), ids
        logits = apply_top_k(logits, p.top_k)
        logits = apply_top_p(logits, p.top_p)
        return apply_min_p(logits, p.min_p), None
