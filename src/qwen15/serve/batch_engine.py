"""Continuous batching over a paged KV cache, in one background thread.

Every step the scheduler hands out a token budget: first one token to each sequence that is decoding,
then chunks of prompt to sequences still catching up (chunked prefill). There are no separate prefill
and decode phases: a sequence just computes the tokens it has not computed yet, and whenever it has
computed all of them its last logits give the next token. Sequences join at any step (when there is room
in the batch and blocks in the pool) and leave as soon as they finish or are cancelled.

Rows of one step run as at most two forwards: the one-token decode rows together ([B, 1]), and the
prefill chunks together ([B, T] padded), each row at its own positions with its own mask over its own
blocks (see PagedKVCache). Splitting these keeps short decode rows from being padded to a chunk's length.
With compact weights on the CPU, every step runs through the C layers instead (quant/native_layers.py):
the tokens laid end to end, at most 64 a call, each reading its own sequence's slots of the pool. That
makes serving batch-invariant: a row is computed by the same kernels in the same order whether it runs
alone or with others, so a request's log-probs and greedy tokens do not depend on the server's load.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..engine.sampling import Sampler, SamplingParams
from ..model import Transformer, rope_cos_sin
from ..quant import native_layers
from ..tokenizer import Tokenizer
from .paged_cache import OutOfBlocks, PagedKVCache, block_hashes
from .text import TextTracker


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely ids and their log-probs (empty when not asked for)


@dataclass
class Output:
    """What one step produced for one sequence (sent to the request's callback)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, when the prompt is done (echo)
    finish_reason: str | None = None  # "stop", "length", "abort" on the last output
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # an engine failure (the server answers 500)


@dataclass(eq=False)  # compared by identity: the engine keeps them in lists
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    max_new: int  # most new tokens (already capped by the context window)
    emit: Callable[[Output], None]
    logprobs: int | None = None  # None: no logprobs for new tokens; k: the chosen one plus the top k
    prompt_logprobs: int | None = None  # None: none; k: log-prob of every prompt token (+ top k) — echo
    constraint: object | None = None  # e.g. a JSON constraint: .allowed(text) / .complete(text)
    adapter: str | None = None  # the LoRA adapter this sequence runs with (None: the base model)
    id: int = 0
    # ---- state, owned by the engine thread ----
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    computed: int = 0  # leading tokens whose keys/values are in the cache
    block_table: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # chained hashes of the full, computed blocks
    pending_hashes: frozenset = frozenset()  # hashes of the prompt's full blocks it will compute (admission)
    generated: list[int] = field(default_factory=list)
    prompt_lp: list[TokenLogprob | None] = field(default_factory=list)
    sampler: Sampler | None = None
    text: TextTracker | None = None
    arrived: float = 0.0
    first_token_at: float | None = None

    @property
    def catching_up(self) -> int:
        return len(self.tokens) - self.computed


def _salt(seq: Sequence):
    """Starts a sequence's block-hash chain: base rows share blocks with base rows, adapter rows with rows
    of the same adapter only."""
    return None if seq.adapter is None else ("lora", seq.adapter)


class BatchEngine:
    """Owns the model, the paged cache and the scheduler thread. Thread-safe: submit() and abort()."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, context_length: int, max_batch: int = 16,
                 token_budget: int = 512, kv_tokens: int = 65536, block_size: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.max_batch = max_batch
        self.token_budget = max(token_budget, max_batch)  # every decoding row gets its token each step
        num_blocks = max(kv_tokens // block_size, 1)
        self.cache = PagedKVCache(model.config, num_blocks, block_size, dtype=model.dtype, device=model.device)
        # Compact weights on the CPU: every step runs all layers in the C layers, at most native_layers.MAX_ROWS
        # tokens a call, each token over its own slots of the pool (no padding, no gathered copy of the keys).
        self.native = None
        # With LoRA adapters loaded, every row runs the PyTorch layers, each row with its own adapter
        # (lora.LoraLinear per-row selection); the C layers cannot add the adapters' terms, and
        # native_layers.supported() says no once a LoraLinear wraps a matrix.
        from ..lora import lora_layers

        self.lora = bool(lora_layers(model))
        if model.dtype == torch.float32 and model.device.type == "cpu" and native_layers.supported(model):
            self.native = native_layers.NativeLayers(model)
        head = model.model.embed_tokens if model.lm_head is None else model.lm_head
        self.head_rows = native_layers.kernel_rows(head) if self.native is not None else 0
        self.block_size = block_size
        # Tensor parallelism (parallel/): each step's batch goes to the other ranks, which run their shard
        # over their own paged cache of the same blocks; logits and sampling stay here on rank 0.
        self.tp = getattr(model, "tp", None)
        self.eos_ids = set(tokenizer.eos_token_ids)
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._incoming: deque[Sequence] = deque()
        self._aborts: set[int] = set()
        self.waiting: deque[Sequence] = deque()  # admitted to the engine, not yet running
        self.running: list[Sequence] = []
        self.last_batch_size = 0
        self.steps = 0
        self.step_seconds = 0.0  # time inside step() (for /metrics: steps / step_seconds is the step rate)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="qwen15-batch-engine", daemon=True)

    # ---- public, any thread -------------------------------------------------------------------------
    @property
    def kv_capacity_tokens(self) -> int:
        return self.cache.blocks.num_blocks * self.block_size

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, seq: Sequence) -> int:
        seq.id = next(self._ids)
        seq.tokens = list(seq.prompt_ids)
        seq.arrived = time.perf_counter()
        with self._lock:
            self._incoming.append(seq)
            self._lock.notify()
        return seq.id

    def abort(self, seq_id: int) -> None:
        """Cancel a sequence (client gone): it leaves the batch and its blocks are freed at the next step."""
        with self._lock:
            self._aborts.add(seq_id)
            self._lock.notify()

    def queue_depth(self) -> int:
        with self._lock:
            return len(self._incoming) + len(self.waiting)

    # ---- the engine thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._lock:
                while not (self._stop or self._incoming or self._aborts or self.waiting or self.running):
                    self._lock.wait()
                if self._stop:
                    break
                self.waiting.extend(self._incoming)
                self._incoming.clear()
                aborts, self._aborts = self._aborts, set()
            for seq in [s for s in itertools.chain(self.waiting, self.running) if s.id in aborts]:
                self._finish(seq, "abort")
            t0 = time.perf_counter()
            try:
                self.step()
            except Exception as e:  # a bug must not hang every client: fail the batch, keep serving
                if self.tp is not None and type(e).__name__ == "RankFailed":
                    self.tp.report(str(e))  # the group is broken: no step can run again
                    self.tp.kill()
                    os._exit(1)
                for seq in list(self.running):
                    self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
                import traceback

                traceback.print_exc()
            self.step_seconds += time.perf_counter() - t0
        for seq in list(self.waiting) + list(self.running):
            self._finish(seq, "abort")

    @torch.inference_mode()
    def step(self) -> None:
        self._admit()
        rows = self._schedule()
        self.last_batch_size = len(rows)
        if not rows:
            return
        self.steps += 1
        if self.native is not None:
            self._run(rows)  # every row through the C layers (batch-invariant), decode rows and prompt chunks together
            return
        decode = [(s, n) for s, n in rows if n == 1]
        prefill = [(s, n) for s, n in rows if n > 1]
        for group in (decode, prefill):
            if group:
                self._run(group)

    def _admit(self) -> None:
        """Move waiting sequences into the batch while there is room, reusing cached prefix blocks.

        A sequence whose next uncached prefix block is being computed right now by a running sequence (the
        `n` choices of one request, or clients sharing a system prompt that arrive together) waits for it,
        and then reuses the blocks instead of computing the same prefix again; later arrivals go ahead."""
        blocks = self.cache.blocks
        i = 0
        while i < len(self.waiting) and len(self.running) < self.max_batch:
            seq = self.waiting[i]
            if not seq.block_table and seq.prompt_logprobs is None:
                # Reuse cached full blocks, but always leave at least one token to compute (its logits).
                hashes = block_hashes(seq.tokens[:len(seq.tokens) - 1], self.block_size, _salt(seq))
                if self._prefix_in_flight(hashes):
                    i += 1
                    continue
                seq.block_table = blocks.match_prefix(hashes)
                seq.hashes = hashes[:len(seq.block_table)]
                seq.computed = len(seq.block_table) * self.block_size
                seq.pending_hashes = frozenset(hashes[len(seq.block_table):])
            needed = -(-(len(seq.tokens) + 1) // self.block_size) - len(seq.block_table)
            if needed > blocks.available and self.running:
                break  # wait for running sequences to free blocks
            del self.waiting[i]
            if seq.sampler is None:
                seq.sampler = Sampler(seq.params)
                seq.text = TextTracker(self.tokenizer, seq.params.stop)
            self.running.append(seq)

    def _prefix_in_flight(self, hashes: list[int]) -> bool:
        """Is the first of these block hashes that is not cached yet about to be computed by a running sequence?"""
        cached = self.cache.blocks.cached
        k = next((k for k, h in enumerate(hashes) if h not in cached), None)
        return k is not None and any(hashes[k] in s.pending_hashes for s in self.running if s.catching_up > 1)

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to compute this step): decoding rows first, then prompt chunks, within the budget."""
        budget = self.token_budget
        rows = []
        for seq in sorted(self.running, key=lambda s: s.catching_up > 1):
            if seq not in self.running:  # preempted while making room for an earlier row
                continue
            n = min(seq.catching_up, budget)
            if n <= 0:
                continue
            if not self._reserve(seq, seq.computed + n, rows):
                continue
            rows.append((seq, n))
            budget -= n
        return rows

    def _reserve(self, seq: Sequence, length: int, scheduled: list) -> bool:
        """Blocks for positions < length; when the pool is full, preempt the newest other sequence."""
        blocks = self.cache.blocks
        while len(seq.block_table) * self.block_size < length:
            try:
                seq.block_table.append(blocks.allocate())
            except OutOfBlocks:
                victims = [s for s in self.running if s is not seq and all(s is not r for r, _ in scheduled)]
                if not victims:
                    return False
                self._preempt(victims[-1])
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free a sequence's blocks and put it back in the queue; it recomputes (from the prefix cache) later."""
        self.cache.blocks.release(seq.block_table)
        seq.block_table, seq.hashes, seq.computed = [], [], 0
        if not seq.generated:
            seq.prompt_lp = []  # recomputed with the prompt
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def _run(self, rows: list[tuple[Sequence, int]]) -> None:
        """One forward over the rows, then log-probs, sampling and output for each."""
        device = self.model.device
        if self.native is not None:
            flat, offsets = self._forward_native(rows)
        else:
            flat, offsets = self._forward_padded(rows)

        # Logits only where needed: each row's last position when it completes its tokens, and every
        # prompt position of a row that wants prompt log-probs.
        picks, owners = [], []
        for b, (seq, n) in enumerate(rows):
            if self._wants_prompt_logprobs(seq):
                for t in range(n):
                    picks.append(offsets[b] + t)
                    owners.append((b, t))
            elif seq.computed + n == len(seq.tokens):
                picks.append(offsets[b] + n - 1)
                owners.append((b, n - 1))
        pick = torch.tensor(picks, dtype=torch.long, device=device)
        logits = self._head(flat[pick]).float().cpu() if picks else None
        where = {owner: i for i, owner in enumerate(owners)}

        for b, (seq, n) in enumerate(rows):
            if self._wants_prompt_logprobs(seq):
                self._record_prompt_logprobs(seq, n, logits[[where[(b, t)] for t in range(n)]])
            seq.computed += n
            self._register_full_blocks(seq)
            if seq.computed == len(seq.tokens):
                self._next_token(seq, logits[where[(b, n - 1)]].unsqueeze(0))

    def _forward_padded(self, rows: list[tuple[Sequence, int]]) -> tuple[Tensor, list[int]]:
        """The PyTorch layers over rows padded to [B, T]: (hidden states [B * T, H], each row's first index)."""
        device = self.model.device
        B, T = len(rows), max(n for _, n in rows)
        S = max(seq.computed + n for seq, n in rows)
        ids = torch.zeros(B, T, dtype=torch.long)
        positions = torch.zeros(B, T, dtype=torch.long)
        mask = torch.zeros(B, 1, T, S, dtype=torch.bool)
        mask[:, :, :, 0] = True  # padding queries attend to something (no all-masked softmax rows)
        read = torch.zeros(B, S, dtype=torch.long)
        write_slots, write_index = [], []
        for b, (seq, n) in enumerate(rows):
            start, end = seq.computed, seq.computed + n
            ids[b, :n] = torch.tensor(seq.tokens[start:end])
            positions[b, :n] = torch.arange(start, end)
            q_pos = torch.arange(start, end)[:, None]
            mask[b, 0, :n, :] = torch.arange(S)[None, :] <= q_pos
            read[b, :end] = self.cache.table_slots(seq.block_table)[:end]
            write_slots += self.cache.slots(seq.block_table, start, end)
            write_index += range(b * T, b * T + n)
        write_slots, write_index = torch.tensor(write_slots), torch.tensor(write_index)
        if self.tp is not None:
            self.tp.send(_follower_step, self.cache.blocks.num_blocks, self.block_size, write_slots, write_index,
                         read, ids, positions, mask)
        self.cache.plan_step(write_slots.to(device), write_index.to(device), read.to(device))
        if self.lora:
            from ..lora import set_adapter

            set_adapter(self.model, [seq.adapter for seq, _ in rows])
        hidden = self.model.hidden_states(ids.to(device), self.cache, 0, positions.to(device), mask.to(device))
        return hidden.reshape(B * T, -1), [b * T for b in range(B)]

    def _forward_native(self, rows: list[tuple[Sequence, int]]) -> tuple[Tensor, list[int]]:
        """The C layers over the rows' tokens laid end to end: (hidden states [N, H], each row's first index).

        Batch-invariant: the tokens go through consecutive calls of at most MAX_ROWS tokens, in order, so a
        token's keys/values are in the pool before any later token reads them, and the C layers compute each
        token exactly as alone (same kernels, same reduction order). A request's log-probs and greedy tokens
        then do not depend on what else is in the batch, nor on how its prompt was chunked."""
        tokens = [(seq, p) for seq, n in rows for p in range(seq.computed, seq.computed + n)]
        offsets = list(itertools.accumulate((n for _, n in rows[:-1]), initial=0))
        tables: dict[int, Tensor] = {}  # a sequence's pool slots by position (int32), once a step
        for seq, _ in rows:
            tables[id(seq)] = self.cache.table_slots(seq.block_table).to(torch.int32)
        MAX = native_layers.MAX_ROWS
        hidden = [self._native_call(tokens[i:i + MAX], tables) for i in range(0, len(tokens), MAX)]
        return torch.cat(hidden) if len(hidden) > 1 else hidden[0], offsets

    def _native_call(self, tokens: list[tuple[Sequence, int]], tables: dict[int, Tensor]) -> Tensor:
        """One call of the C layers: token (seq, position) writes its slot and attends to its sequence's slots
        up to its position. Returns the final-normed hidden states [len(tokens), H]."""
        S = max(p for _, p in tokens) + 1
        read = torch.zeros(len(tokens), S, dtype=torch.int32)
        n_read = torch.empty(len(tokens), dtype=torch.int32)
        write = torch.empty(len(tokens), dtype=torch.int32)
        for i, (seq, p) in enumerate(tokens):
            table = tables[id(seq)]
            read[i, :p + 1] = table[:p + 1]
            n_read[i] = p + 1
            write[i] = table[p]
        config = self.model.config
        x = self.model.model.embed_tokens(torch.tensor([seq.tokens[p] for seq, p in tokens]))
        positions = torch.tensor([p for _, p in tokens])
        cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta, x.dtype)
        hidden = self.native.forward_rows(x, cos, sin, self.cache, write, read, n_read)
        return self.model.model.norm(hidden)

    def _head(self, h: Tensor) -> Tensor:
        """Logits of final hidden states [N, H]: with the C layers, in calls of at most the head kernel's row
        limit, so that every row goes through the kernel it would alone (more rows would switch to BLAS)."""
        rows = self.head_rows
        if not rows or h.shape[0] <= rows:
            return self.model.head(h)
        return torch.cat([self.model.head(h[i:i + rows]) for i in range(0, h.shape[0], rows)])

    @staticmethod
    def _wants_prompt_logprobs(seq: Sequence) -> bool:
        return seq.prompt_logprobs is not None and not seq.generated and seq.computed < len(seq.prompt_ids)

    def _record_prompt_logprobs(self, seq: Sequence, n: int, logits: Tensor) -> None:
        """Log-prob of each prompt token given the ones before it (the first token has none)."""
        if seq.computed == 0:
            seq.prompt_lp.append(None)
        lp = torch.log_softmax(logits, dim=-1)  # [n, V]: position p predicts token p + 1
        k = seq.prompt_logprobs
        for t in range(n):
            p = seq.computed + t
            if p + 1 >= len(seq.prompt_ids):
                break
            token = seq.prompt_ids[p + 1]
            top = lp[t].topk(k) if k else None
            seq.prompt_lp.append(TokenLogprob(token, float(lp[t, token]),
                                              list(zip(top.indices.tolist(), top.values.tolist())) if k else []))

    def _register_full_blocks(self, seq: Sequence) -> None:
        full = seq.computed // self.block_size
        while len(seq.hashes) < full:
            i = len(seq.hashes)
            prev = seq.hashes[-1] if seq.hashes else _salt(seq)
            h = hash((prev, tuple(seq.tokens[i * self.block_size:(i + 1) * self.block_size])))
            seq.hashes.append(h)
            self.cache.blocks.register(seq.block_table[i], h)

    def _next_token(self, seq: Sequence, logits: Tensor) -> None:
        """Sample from the last logits, then emit text / stop / finish."""
        out = Output()
        if seq.prompt_logprobs is not None and not seq.generated:
            out.prompt_logprobs = seq.prompt_lp
        if seq.max_new <= len(seq.generated):  # max_tokens 0 (echo scoring): the prompt was all we needed
            self._finish(seq, "length", out)
            return
        token = self._sample(seq, logits)
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        seq.generated.append(token)
        out.token_ids.append(token)
        if seq.logprobs is not None:
            lp = torch.log_softmax(logits[0], dim=-1)
            top = lp.topk(seq.logprobs) if seq.logprobs else None
            out.logprobs.append(TokenLogprob(token, float(lp[token]),
                                             list(zip(top.indices.tolist(), top.values.tolist())) if top else []))
        if token in self.eos_ids and not seq.params.ignore_eos or token in (seq.params.stop_token_ids or ()):
            # The stop token is a generated token (ids, log-probs, completion_tokens), as in vLLM, without its
            # text: harnesses that score `echo` prompts with max_tokens 1 drop the last log-prob as "generated".
            self._finish(seq, "stop", out)
            return
        seq.tokens.append(token)
        out.text = seq.text.add(token)
        if seq.text.stopped:
            self._finish(seq, "stop", out)
        elif seq.constraint is not None and seq.constraint.complete(seq.text.text + seq.text.pending):
            self._finish(seq, "stop", out)
        elif len(seq.generated) >= seq.max_new:
            self._finish(seq, "length", out)
        else:
            seq.emit(out)

    def _sample(self, seq: Sequence, logits: Tensor) -> int:
        if seq.constraint is None:
            return int(seq.sampler.sample(logits, seq.prompt_ids, seq.generated)[0])
        return seq.constraint.sample(seq, logits)

    def _finish(self, seq: Sequence, reason: str, out: Output | None = None, error: str | None = None) -> None:
        out = out or Output()
        if seq.text is not None and reason in ("stop", "length"):
            out.text += seq.text.finish()
        out.finish_reason = reason
        out.prompt_tokens = len(seq.prompt_ids)
        out.completion_tokens = len(seq.generated)
        if error:
            out.error = error
        self.cache.blocks.release(seq.block_table)
        seq.block_table = []
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.emit(out)


def _follower_step(state, num_blocks: int, block_size: int, write_slots: Tensor, write_index: Tensor, read: Tensor,
                   ids: Tensor, positions: Tensor, mask: Tensor) -> None:
    """A tensor-parallel follower's part of one padded step: its shard over its own pool (same block ids)."""
    model, dev = state.model, state.model.device
    cache = state.caches.get("paged")
    if cache is None:
        cache = state.caches["paged"] = PagedKVCache(model.config, num_blocks, block_size, dtype=model.dtype, device=dev)
    cache.plan_step(write_slots.to(dev), write_index.to(dev), read.to(dev))
    model.hidden_states(ids.to(dev), cache, 0, positions.to(dev), mask.to(dev))
