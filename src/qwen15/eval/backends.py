"""What a task asks of a model: loglikelihoods of continuations, and generations. Two implementations.

EngineBackend runs the in-process model, reusing the KV cache of the shared prefix between requests, and
sends only the scored positions through the vocabulary head. EndpointBackend asks any OpenAI-compatible server: loglikelihoods through
`/v1/completions` with `echo: true, logprobs: 1, max_tokens: 0`, generations through completions or chat.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import math
import urllib.request
from dataclasses import dataclass, field

from ..errors import EvalError


class BackendError(EvalError, RuntimeError):
    """A model or endpoint that could not answer an evaluation request."""


@dataclass
class GenParams:
    max_tokens: int = 512
    stop: list[str] = field(default_factory=list)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Backend:
    fingerprint: str = ""

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]:
        """Sum of log p(continuation tokens | context) for each (context, continuation)."""
        raise NotImplementedError

    def generate(self, prompt: str | list[dict], params: GenParams) -> str:
        """The completion of a raw prompt, or the answer to a chat (a list of messages)."""
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 4)  # fallback: ~4 characters per token

    def truncate_to_tokens(self, text: str, tokens: int) -> str:
        return text[:4 * tokens]  # fallback for endpoints without a tokenizer: ~4 characters per token

    def letter_logprobs(self, context: str, letters: list[str], prefix: str = " ") -> list[float]:
        """Qwen's MC protocol: log-softmax restricted to the letter tokens (' A', ' B', ...) after context.

        Normalising loglikelihood(context, ' X') over the letters is the same thing, and works on any backend.
        """
        lls = self.loglikelihood([(context, f"{prefix}{letter}") for letter in letters])
        top = max(lls)
        norm = top + math.log(sum(math.exp(x - top) for x in lls))
        return [x - norm for x in lls]


class EngineBackend(Backend):
    """The in-process model. Requests share a KV cache: each forward starts where the new token ids part
    from the previous request's, so few-shot headers and a question's several continuations are computed
    once (the runner keeps documents in dataset order, so neighbours share their exemplars)."""

    def __init__(self, llm):
        self.llm = llm
        self.tok = llm.tokenizer
        self.fingerprint = _model_fingerprint(llm)
        self._cache = None  # KVCache holding the keys/values of self._cached_ids
        self._cached_ids: list[int] = []

    def count_tokens(self, text: str) -> int:
        return len(self.tok.encode(text))

    def truncate_to_tokens(self, text: str, tokens: int) -> str:
        # Encode only a generous prefix: tokens rarely span more than 8 characters.
        return self.tok.decode(self.tok.encode(text[:8 * tokens + 64])[:tokens])

    def _pair_ids(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # lm-eval's split: spaces at the end of the context move to the continuation, each encoded alone.
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = self.tok.encode(context) if context else []
        cont = self.tok.encode(continuation)
        if not cont:
            raise BackendError(f"continuation {continuation!r} encodes to no tokens: expected non-empty text")
        if not ctx:
            raise BackendError("empty context: expected at least one context token")
        return ctx, cont

    def _hidden_from(self, ids: list[int], need_from: int):
        """Final hidden states [T - start, H] of ids from some start <= need_from, reusing the cached prefix."""
        import torch

        from ..engine.kv_cache import KVCache

        if len(ids) > self.llm.context_length:
            raise BackendError(f"request of {len(ids)} tokens exceeds the context window of "
                               f"{self.llm.context_length}: expected shorter prompts (fewer shots)")
        if self._cache is None or self._cache.max_len < len(ids):
            self._cache = KVCache(self.llm.config, max(len(ids), min(4096, self.llm.context_length)),
                                  dtype=self.llm.dtype, device=self.llm.device)
            self._cached_ids = []
        start = 0
        for a, b in zip(ids, self._cached_ids):
            if a != b:
                break
            start += 1
        start = min(start, need_from, len(ids) - 1)
        self._cached_ids = []  # invalid while the forward writes into the cache
        from ..engine.engine import PREFILL_CHUNK

        pieces = []  # chunked like the engine's prefill: bounds attention memory on long prompts
        for pos in range(start, len(ids), PREFILL_CHUNK):
            chunk = torch.tensor([ids[pos:pos + PREFILL_CHUNK]], device=self.llm.device)
            pieces.append(self.llm.model.hidden_states(chunk, cache=self._cache, start_pos=pos)[0])
        self._cached_ids = list(ids)
        return torch.cat(pieces), start

    def token_logprobs(self, sequences: list[tuple[list[int], int]]) -> list[list[float]]:
        """For each (ids, n): the log-probabilities of the last n tokens of ids given those before."""
        import torch

        out = []
        with torch.inference_mode():
            for ids, n in sequences:
                first = len(ids) - n - 1  # the position whose logits predict the first scored token
                hidden, start = self._hidden_from(ids, first)
                logits = self.llm.model.head(hidden[first - start:len(ids) - 1 - start]).float()  # [n, V]
                targets = torch.tensor(ids[-n:], device=logits.device)
                out.append(torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0].tolist())
        return out

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]:
        seqs = []
        for context, continuation in requests:
            ctx, cont = self._pair_ids(context, continuation)
            seqs.append((ctx + cont, len(cont)))
        return [sum(lps) for lps in self.token_logprobs(seqs)]

    def letter_logprobs(self, context: str, letters: list[str], prefix: str = " ") -> list[float]:
        """One forward of the context; log-softmax over the letter tokens at its last position."""
        ids = [self.tok.encode(f"{prefix}{letter}") for letter in letters]
        if any(len(i) != 1 for i in ids) or context.endswith(" "):
            return super().letter_logprobs(context, letters, prefix)  # letters that are not one token each: the long way
        import torch

        ctx = self.tok.encode(context)
        with torch.inference_mode():
            hidden, _ = self._hidden_from(ctx, len(ctx) - 1)
            logits = self.llm.model.head(hidden[-1:]).float()[0]  # [V]
            picked = logits[torch.tensor([i[0] for i in ids], device=logits.device)]
            return torch.log_softmax(picked.double(), 0).tolist()

    def generate(self, prompt: str | list[dict], params: GenParams) -> str:
        if params.temperature > 0:  # sampled: the engine's own loop (seeded sampler)
            from ..engine.sampling import SamplingParams

            sampling = SamplingParams(temperature=params.temperature, top_p=params.top_p, seed=params.seed,
                                      max_tokens=params.max_tokens, stop=list(params.stop))
            return self.llm.generate(prompt, params=sampling).text
        return self._greedy(self.llm.encode_prompt(prompt), params)

    def _greedy(self, ids: list[int], params: GenParams) -> str:
        """Greedy decoding on the shared cache, so few-shot prompts reuse their exemplars' keys/values."""
        import torch

        if not ids:
            raise BackendError("prompt is empty: expected at least one token")
        max_new = min(params.max_tokens, self.llm.context_length - len(ids))
        if max_new <= 0:
            raise BackendError(f"prompt of {len(ids)} tokens leaves no room in the context window of "
                               f"{self.llm.context_length}")
        stop_ids = set(self.tok.eos_token_ids)
        seq = list(ids)
        decoder = self.tok.stream_decoder()
        text = ""
        with torch.inference_mode():
            if self._cache is None or self._cache.max_len < len(ids) + max_new:
                self._cache = None
                from ..engine.kv_cache import KVCache

                self._cache = KVCache(self.llm.config, max(len(ids) + max_new, min(4096, self.llm.context_length)),
                                      dtype=self.llm.dtype, device=self.llm.device)
                self._cached_ids = []
            hidden, _ = self._hidden_from(seq, len(seq) - 1)
            logits = self.llm.model.head(hidden[-1:])[0]
            for _ in range(max_new):
                token = int(torch.argmax(logits))
                if token in stop_ids:
                    break
                seq.append(token)
                text += decoder.add(token)
                if any(s and s in text for s in params.stop):
                    break
                self._cached_ids = []
                logits = self.llm.model(torch.tensor([[token]], device=self.llm.device), cache=self._cache,
                                        start_pos=len(seq) - 1, last_only=True)[0, -1]
                self._cached_ids = list(seq)
            text += decoder.flush()
        cuts = [i for i in (text.find(s) for s in params.stop if s) if i >= 0]
        return text[:min(cuts)] if cuts else text


def _model_fingerprint(llm) -> str:
    """A stable id of the weights: sha256 over config and a sample of parameter values."""
    import torch

    h = hashlib.sha256(json.dumps(llm.config.__dict__, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in sorted(llm.model.state_dict().items()):
            h.update(name.encode())
            flat = tensor.detach().reshape(-1)
            if flat.is_floating_point() and flat.numel():
                h.update(flat[:: max(1, flat.numel() // 256)][:256].float().cpu().numpy().tobytes())
    return f"{llm.name}@{h.hexdigest()[:16]}"


class EndpointBackend(Backend):
    """Any OpenAI-compatible server at base_url (with or without the trailing /v1)."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, chat: bool = False,
                 timeout_s: float = 600.0):
        self.base = base_url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.api_key, self.chat, self.timeout_s = api_key, chat, timeout_s
        self.model = model or self._first_model()
        self.fingerprint = f"endpoint:{self.base}:{self.model}"

    top_logprobs = 20  # asked for at once by letter_logprobs (vLLM's and this project's limit)

    def _post(self, path: str, body: dict) -> dict:
        return self._request(path, json.dumps(body).encode())

    def _request(self, path: str, data: bytes | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base + path, data=data, headers=headers, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:300]
            raise BackendError(f"{self.base}{path}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise BackendError(f"{self.base}{path}: cannot reach the endpoint: {getattr(e, 'reason', e)}") from None
        except json.JSONDecodeError:
            raise BackendError(f"{self.base}{path}: the answer is not JSON") from None

    def _first_model(self) -> str:
        models = self._request("/models").get("data") or []
        if not models:
            raise BackendError(f"{self.base}/models lists no model: pass --endpoint-model")
        return models[0]["id"]

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]:
        out = []
        for context, continuation in requests:
            body = {"model": self.model, "prompt": context + continuation, "max_tokens": 0, "echo": True,
                    "logprobs": 1, "temperature": 0.0}
            choice = self._post("/completions", body)["choices"][0]
            lp = choice.get("logprobs") or {}
            offsets, values = lp.get("text_offset"), lp.get("token_logprobs")
            if not offsets or values is None:
                raise BackendError(f"{self.base}/completions returned no echoed logprobs: the server must "
                                   f"support echo=true with logprobs and max_tokens=0")
            # Tokens that start at or after the end of the context belong to the continuation.
            picked = [v for off, v in zip(offsets, values) if off >= len(context)]
            if not picked or any(v is None for v in picked):
                raise BackendError(f"{self.base}/completions: no logprobs for the continuation {continuation!r}")
            out.append(float(sum(picked)))
        return out

    def letter_logprobs(self, context: str, letters: list[str], prefix: str = " ") -> list[float]:
        """One echo request for the context and the first letter, reading every letter's log-prob from the
        top log-probs at that position (servers give up to 20, OpenAI 5); the long way (a request per letter)
        for letters that are not there. The same numbers as Backend.letter_logprobs, at a quarter of the
        requests: what makes multiple choice over an endpoint as fast as in process."""
        conts = [f"{prefix}{letter}" for letter in letters]
        body = {"model": self.model, "prompt": context + conts[0], "max_tokens": 0, "echo": True,
                "logprobs": self.top_logprobs, "temperature": 0.0}
        try:
            lp = self._post("/completions", body)["choices"][0].get("logprobs") or {}
        except BackendError:
            lp = {}  # e.g. a server that allows fewer top log-probs: the long way
        offsets, tops = lp.get("text_offset") or [], lp.get("top_logprobs") or []
        at = [i for i, off in enumerate(offsets) if off >= len(context)]
        top = tops[at[0]] if len(at) == 1 and len(tops) > at[0] and tops[at[0]] else {}
        if not all(c in top for c in conts):
            return super().letter_logprobs(context, letters, prefix)
        lls = [float(top[c]) for c in conts]
        m = max(lls)
        norm = m + math.log(sum(math.exp(x - m) for x in lls))
        return [x - norm for x in lls]

    def generate(self, prompt: str | list[dict], params: GenParams) -> str:
        body = {"model": self.model, "max_tokens": params.max_tokens, "temperature": params.temperature,
                "top_p": params.top_p}
        if params.stop:
            body["stop"] = params.stop[:4]  # OpenAI accepts at most 4; the rest are cut client-side below
        if params.seed is not None:
            body["seed"] = params.seed
        if isinstance(prompt, list) or self.chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            text = self._post("/chat/completions", {**body, "messages": messages})["choices"][0]["message"]["content"]
        else:
            text = self._post("/completions", {**body, "prompt": prompt})["choices"][0]["text"]
        text = text or ""
        cuts = [i for i in (text.find(s) for s in params.stop if s) if i >= 0]
        return text[:min(cuts)] if cuts else text
