"""The LLM object: load a checkpoint, then generate or stream text from it.

    llm = LLM.load("qwen2.5-coder-0.5b-instruct")
    print(llm.generate("def fibonacci(n):", max_tokens=32).text)
    for piece in llm.stream([{"role": "user", "content": "Hi"}]): print(piece, end="")
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import GenerationError
from ..model import Transformer, build_model
from ..quant import repack_cache
from ..quant.modules import fuse_state, set_activations
from ..quant.native import interleave_state
from ..tokenizer import Tokenizer
from .kv_cache import KVCache
from .sampling import Sampler, SamplingParams

PREFILL_CHUNK = 512  # prompt tokens per forward: bounds activation memory on long prompts


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (eos or stop string) or "length"
    load_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first new token comes from the prefill; the rest are decode steps.
        steps = max(len(self.token_ids) - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class _Run:
    """Book-keeping of one generation, filled in as tokens stream out."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    prefill_s: float = 0.0
    decode_s: float = 0.0
    drafted: int = 0  # speculative decoding: tokens the draft proposed, and how many the target kept
    accepted: int = 0


# gguf: a GGUF's Q8_0, Q5_0, Q4_0, Q4_K and Q6_K matrices stay as the file stores them (gguf_kernels.c
#   unpacks each block in registers; other types become block int8), and decode rounds activations to
#   int8 per block of 32 (llama.cpp's way; perplexity within 0.5% of the exact path, tested);
# gguf-int8: every quantized matrix converted to block int8 (quant/blocks.py): the same int8 products in
#   ~20% more memory (on AVX2 the file's blocks, interleaved by 8 rows, sum each block's products exactly
#   before one float step, and Q4_K/Q6_K round activations per 256: results differ in the last bits);
# gguf-f32: block int8 with float activations (exact up to summation order);
# int8: dense checkpoints (HF safetensors, or a GGUF dequantized) quantized on load, group-wise int8;
# none: every weight dequantized to the model dtype.
QUANT_MODES = ("gguf", "gguf-int8", "gguf-f32", "int8", "none")


def _release_large_frees() -> None:
    """Ask glibc to serve allocations over 256 KiB by mmap, so that freeing one returns it to the system.

    Loading converts, fuses and frees hundreds of weight-sized arrays; under glibc's default (a threshold
    that grows up to 32 MiB) those land in the heap, whose holes the next, larger array cannot reuse:
    the 0.5B's peak RSS was 1.33 GB with it and 1.05 GB without. No-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def load_checkpoint(path: Path, dtype: torch.dtype, device: str,
                    quant: str = "gguf") -> tuple[ModelConfig, Transformer, Tokenizer]:
    """A resolved local path (a .gguf file or an HF directory) to config, model and tokenizer.

    quant="gguf" / "gguf-f32": a GGUF's quantized matrices stay compact (block int8, quant/blocks.py)
    when running on CPU in float32, with int8 or float activations in decode; quant="none"
    dequantizes everything to `dtype` (always the case on CUDA)."""
    if quant not in QUANT_MODES:
        raise GenerationError(f"unknown quant mode {quant!r}: expected one of {', '.join(QUANT_MODES)}")
    if quant == "int8" and path.is_file():
        # A GGUF is quantized already: rounding its values again to int8 groups adds a second error and
        # took 33 s on the 1.5B, while gguf-int8 gives block int8 without loss.
        raise GenerationError(f"--quant int8 quantizes dense (safetensors) checkpoints, and {path.name} is a "
                              f"GGUF: use --quant gguf-int8 (its blocks as int8, lossless) or gguf")
    _release_large_frees()
    if path.is_file():
        from ..weights.gguf import load_gguf

        # The compact layout kept in memory (None: dequantize); also the name of its repack cache.
        layout = {"gguf": "packed", "gguf-int8": "int8", "gguf-f32": "int8"}.get(quant) \
            if str(device) == "cpu" and dtype == torch.float32 else None
        cached = repack_cache.load(path, layout) if layout and repack_cache.enabled() else None
        if cached is not None:  # the block-int8 arrays of an earlier load: skip decoding the file
            from ..weights.gguf import config_from_gguf, open_gguf

            f = open_gguf(path)
            metadata = dict(f.metadata)
            config = config_from_gguf(metadata, {t.name: t.torch_shape for t in f.tensors}, path)
            state_dict = cached
        else:
            keep = {"packed": "packed", "int8": True}.get(layout, False)
            config, state_dict, metadata = load_gguf(path, dtype=dtype, keep_quantized=keep)
            fuse_state(state_dict)  # cached fused, so a warm load builds the model without copying
            if layout == "packed":
                interleave_state(state_dict)  # cached interleaved too: a warm load does not repack
            if layout and repack_cache.enabled():
                repack_cache.save(path, state_dict, layout)
        tokenizer = Tokenizer.from_gguf_metadata(metadata)
    else:
        from ..weights.safetensors import load_safetensors

        config = ModelConfig.from_hf_config(path)
        state_dict = load_safetensors(path, config, dtype=dtype)
        tokenizer = Tokenizer.from_file(path)
    if quant == "int8":
        if str(device) != "cpu" or dtype != torch.float32:
            raise GenerationError(f"--quant int8 runs on the CPU in float32, not on {device} in {dtype}")
        from ..quant.blocks import quantize_int8

        for name in [k for k, v in state_dict.items() if isinstance(v, torch.Tensor) and v.dim() == 2
                     and v.shape[1] % 32 == 0]:
            state_dict[name] = quantize_int8(state_dict.pop(name))
        fuse_state(state_dict)
    model = build_model(config, state_dict, device=device, dtype=dtype)
    set_activations(model, "f32" if quant == "gguf-f32" else "q8")
    return config, model, tokenizer


def _load_sharded(path: Path, dtype: torch.dtype, device: str, quant: str, world: int, threads: int | None):
    """Rank 0 of a tensor-parallel group: read the checkpoint once, hand each rank its shard, keep its own."""
    if quant != "none":
        raise GenerationError(f"--tp {world} shards dense weights: add --quant none (got --quant {quant})")
    config, net, tokenizer = load_checkpoint(path, dtype, "cpu", quant=quant)
    return shard_model(net, world, device, dtype, threads), tokenizer


def shard_model(net: Transformer, world: int, device: str, dtype: torch.dtype, threads: int | None = None) -> Transformer:
    """Start the group (torchrun's, or spawned here) and hand each rank its shard of net; returns rank 0's."""
    from ..parallel import group, tp

    tp.plan(net.config, world)  # an invalid degree fails before any process starts
    return tp.distribute(net, group.start(world, device, threads), device, dtype)


class LLM:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, context_length: int | None = None,
                 name: str = "", load_s: float = 0.0, compile: bool | None = None):
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        self.name = name
        self.load_s = load_s
        self.device = model.device
        self.dtype = model.dtype
        self.context_length = min(context_length or self.config.max_position_embeddings,
                                  self.config.max_position_embeddings)
        self.draft: LLM | None = None
        self.draft_tokens = 4
        # On CUDA the one-token decode step is compiled and replayed as a CUDA graph: that needs one
        # cache at a fixed address (made on first use) and tensor positions (static shapes).
        self.compile = compile if compile is not None else self.device.type == "cuda"
        self._static_cache: KVCache | None = None
        self._compiled_step = None

    def attach_draft(self, draft: "LLM", tokens: int = 4) -> None:
        """Use draft for speculative decoding of greedy requests (the output stays the target's own)."""
        from .speculative import check_compatible

        if getattr(self.model, "tp", None) is not None:
            raise GenerationError("--draft does not run with --tp: speculative decoding is single-process")
        why = check_compatible(self, draft)
        if why:
            raise GenerationError(f"draft model {draft.name!r} cannot draft for {self.name!r}: {why}")
        if tokens < 1:
            raise GenerationError(f"draft tokens must be >= 1, got {tokens}")
        self.draft, self.draft_tokens = draft, tokens

    @classmethod
    def load(cls, model: str | Path | None = None, *, device: str = "cpu", dtype: torch.dtype | str | None = None,
             threads: int | None = None, context_length: int | None = None, compile: bool | None = None,
             quant: str = "gguf", tp: int | None = None) -> "LLM":
        """Load a packaged name, hub name, local directory or .gguf file (None: the default model).

        quant: "gguf" keeps a GGUF's quantized weights compact on CPU (float32); "none" dequantizes.
        tp: shard the model over this many ranks (parallel/), this process being rank 0; under torchrun
        the ranks it started (then tp may be left out)."""
        from ..checks import check_device, check_positive
        from ..weights.resolve import resolve_model

        check_device(str(device))  # before the load: a wrong device otherwise fails deep in torch, after it
        check_positive("threads", threads)
        check_positive("context", context_length)
        if threads:
            torch.set_num_threads(threads)
        if isinstance(dtype, str):
            dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                     "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
        dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
        start = time.perf_counter()
        path = resolve_model(None if model is None else str(model))
        from ..parallel.group import torchrun_world

        if tp is not None and tp < 1:
            raise GenerationError(f"--tp must be >= 1, got {tp}")
        world = tp or torchrun_world()
        if world > 1:
            net, tokenizer = _load_sharded(path, dtype, device, quant, world, threads)
            compile = False  # the compiled CUDA-graph step is single-process
        else:
            _, net, tokenizer = load_checkpoint(path, dtype, device, quant=quant)
        return cls(net, tokenizer, context_length=context_length, name=str(model or path.name),
                   load_s=time.perf_counter() - start, compile=compile)

    # ---- prompts --------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[dict] | list[int], chat: bool = False) -> list[int]:
        """Token ids for a raw string, a chat (list of messages, or a string sent as one user turn), or ids."""
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) and prompt:
            return list(prompt)
        if isinstance(prompt, list):
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True))
        if not isinstance(prompt, str):
            raise GenerationError(f"prompt must be a string, a list of messages or a list of token ids, "
                                  f"got {type(prompt).__name__}")
        if chat:
            return self.encode_prompt([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    # ---- the loop -------------------------------------------------------------------------------
    @torch.inference_mode()
    def _tokens(self, run: _Run, params: SamplingParams) -> Iterator[int]:
        """Prefill the prompt, then decode one token per step until eos, max_tokens or the context is full."""
        prompt = run.prompt_ids
        if not prompt:
            raise GenerationError("prompt is empty: expected at least one token")
        if len(prompt) >= self.context_length:
            raise GenerationError(
                f"prompt is {len(prompt)} tokens but the context window is {self.context_length}: "
                f"expected at most {self.context_length - 1} prompt tokens")
        max_new = min(params.max_tokens, self.context_length - len(prompt))
        if max_new <= 0:
            run.finish_reason = "length"
            return
        stop_ids = set() if params.ignore_eos else set(
            params.stop_token_ids if params.stop_token_ids is not None else self.tokenizer.eos_token_ids)
        plain_greedy = params.greedy and params.repetition_penalty == 1.0 and not (
            params.presence_penalty or params.frequency_penalty)
        if self.draft is not None and plain_greedy:  # sampled or penalised requests decode without the draft
            from .speculative import speculative_tokens

            yield from speculative_tokens(self, self.draft, run, max_new, stop_ids, self.draft_tokens)
            return
        if self.compile:
            cache, step = self._compiled_decode(len(prompt) + max_new)
        else:
            cache = KVCache(self.config, len(prompt) + max_new, dtype=self.dtype, device=self.device)
            step = None
        sampler = Sampler(params)

        t0 = time.perf_counter()
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        for start in range(0, len(prompt), PREFILL_CHUNK):
            logits = self.model(ids[:, start:start + PREFILL_CHUNK], cache=cache, start_pos=start, last_only=True)
        pos = len(prompt)
        run.prefill_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        while True:
            token = int(sampler.sample(logits[:, -1], prompt, run.token_ids)[0])
            if token in stop_ids:
                run.finish_reason = "stop"
                break
            run.token_ids.append(token)
            yield token
            if len(run.token_ids) >= max_new:
                run.finish_reason = "length"
                break
            token_ids = torch.tensor([[token]], device=self.device)
            if step is not None:
                logits = step(token_ids, torch.tensor([pos], device=self.device), cache)
            else:
                logits = self.model(token_ids, cache=cache, start_pos=pos, last_only=True)
            pos += 1
            run.decode_s = time.perf_counter() - t0
        run.decode_s = time.perf_counter() - t0

    def _compiled_decode(self, needed: int):
        """The persistent static cache and the compiled one-token step (built on first use)."""
        if self._static_cache is None or self._static_cache.max_len < needed:
            self._static_cache = KVCache(self.config, max(needed, min(self.context_length, 4096)),
                                         dtype=self.dtype, device=self.device)
            torch._dynamo.mark_static_address(self._static_cache.k)
            torch._dynamo.mark_static_address(self._static_cache.v)
            model = self.model

            def step(token_ids, position, cache):
                return model(token_ids, cache=cache, start_pos=position, last_only=True).clone()

            self._compiled_step = torch.compile(step, mode="reduce-overhead", fullgraph=True)
        return self._static_cache, self._compiled_step

    def _stream(self, run: _Run, params: SamplingParams) -> Iterator[str]:
        """Text pieces, never a partial character, and cut at the first stop string."""
        decoder = self.tokenizer.stream_decoder()
        pending = ""  # text held back while it could still be the start of a stop string
        hold = max((len(s) for s in params.stop), default=0) - 1
        for token in self._tokens(run, params):
            pending += decoder.add(token)
            hit = _first_stop(pending, params.stop)
            if hit is not None:
                piece = pending[:hit]
                run.text += piece
                run.finish_reason = "stop"
                if piece:
                    yield piece
                return
            emit = pending[: len(pending) - hold] if hold > 0 else pending
            pending = pending[len(emit):]
            if emit:
                run.text += emit
                yield emit
        tail = pending + decoder.flush()
        hit = _first_stop(tail, params.stop)
        if hit is not None:
            tail, run.finish_reason = tail[:hit], "stop"
        if tail:
            run.text += tail
            yield tail

    # ---- public API -----------------------------------------------------------------------------
    def stream(self, prompt: str | list[dict] | list[int], *, chat: bool = False,
               params: SamplingParams | None = None, **sampling) -> Iterator[str]:
        """Yield the new text piece by piece."""
        params = params or SamplingParams(**sampling)
        yield from self._stream(_Run(self.encode_prompt(prompt, chat)), params)

    def generate(self, prompt: str | list[dict] | list[int], *, chat: bool = False,
                 params: SamplingParams | None = None, on_text=None, **sampling) -> GenerationResult:
        """Generate to the end and return text, new token ids, finish reason and timings.

        on_text, if given, is called with each text piece as it is produced (for streaming callers).
        """
        params = params or SamplingParams(**sampling)
        run = _Run(self.encode_prompt(prompt, chat))
        for piece in self._stream(run, params):
            if on_text is not None:
                on_text(piece)
        return GenerationResult(text=run.text, token_ids=run.token_ids, prompt_tokens=len(run.prompt_ids),
                                finish_reason=run.finish_reason, load_s=self.load_s,
                                prefill_s=run.prefill_s, decode_s=run.decode_s,
                                drafted=run.drafted, accepted=run.accepted)


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None
