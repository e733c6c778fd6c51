"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one forward.

Greedy only, and exact: every emitted token is the target's own argmax given the tokens before it, so the
output equals the target's plain greedy output; the draft only decides how many tokens one target forward
yields (accepted proposals + the target's next token). Caches are indexed by position, so rejecting
proposals needs no copy: the next forward overwrites the stale positions and attends only up to its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from ..model import rows_as_decode_steps
from .kv_cache import KVCache

if TYPE_CHECKING:
    from .engine import LLM, _Run


def check_compatible(target: "LLM", draft: "LLM") -> str | None:
    """Why draft cannot draft for target (None when it can): they must share one vocabulary."""
    probe = "def f(x):\n    return '你好' + str(x)  # 🐍"
    if target.tokenizer.encode(probe) != draft.tokenizer.encode(probe):
        return "the draft's tokenizer differs from the target's"
    if draft.config.vocab_size > target.config.vocab_size:
        return f"the draft's vocabulary ({draft.config.vocab_size}) is larger than the target's"
    return None


@torch.inference_mode()
def speculative_tokens(target: "LLM", draft: "LLM", run: "_Run", max_new: int, stop_ids: set[int],
                       k: int = 4) -> Iterator[int]:
    prompt = run.prompt_ids
    size = len(prompt) + max_new + k + 1
    tcache = KVCache(target.config, size, dtype=target.dtype, device=target.device)
    dcache = KVCache(draft.config, size, dtype=draft.dtype, device=draft.device)

    def forward(llm, cache, tokens: list[int], start: int, last_only: bool) -> torch.Tensor:
        ids = torch.tensor([tokens], dtype=torch.long, device=llm.device)
        return llm.model(ids, cache=cache, start_pos=start, last_only=last_only)[0]  # [T, V]

    t0 = time.perf_counter()
    logits = None
    for start in range(0, len(prompt), 512):
        logits = forward(target, tcache, prompt[start:start + 512], start, True)
    for start in range(0, len(prompt), 512):
        forward(draft, dcache, prompt[start:start + 512], start, True)
    run.prefill_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    seq = list(prompt)  # invariant: the target cache holds seq[:-1]; the draft cache holds seq[:draft_len]
    draft_len = len(prompt)
    new = [int(logits[-1].argmax())]
    while True:
        for token in new:
            if token in stop_ids:
                run.finish_reason = "stop"
                run.decode_s = time.perf_counter() - t0
                return
            seq.append(token)
            run.token_ids.append(token)
            yield token
            if len(run.token_ids) >= max_new:
                run.finish_reason = "length"
                run.decode_s = time.perf_counter() - t0
                return
        # The draft catches up on what it has not seen, then proposes k tokens one by one.
        proposals: list[int] = []
        with rows_as_decode_steps(draft.model):  # as if decoded one by one: a self-draft is always right
            dl = forward(draft, dcache, seq[draft_len:], draft_len, True)
        draft_len = len(seq)
        for i in range(k):
            proposals.append(int(dl[-1].argmax()))
            if i < k - 1:
                dl = forward(draft, dcache, proposals[-1:], draft_len + i, True)
        # One target forward over the last token and the k proposals: k+1 next-token predictions.
        with rows_as_decode_steps(target.model):
            preds = forward(target, tcache, seq[-1:] + proposals, len(seq) - 1, False).argmax(-1).tolist()
        accepted = 0
        while accepted < k and proposals[accepted] == preds[accepted]:
            accepted += 1
        run.drafted += k
        run.accepted += accepted
        draft_len = len(seq) + min(accepted, k - 1)
        new = proposals[:accepted] + [preds[accepted]]
