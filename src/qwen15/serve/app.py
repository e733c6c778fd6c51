"""The OpenAI-compatible HTTP API (Starlette): /v1/models, /v1/chat/completions, /v1/completions, /health, /metrics.

Handlers validate the request, turn it into engine Sequences (one per choice) and read their outputs from
an asyncio queue the engine thread feeds. A streaming client that goes away cancels the response task;
its sequences are aborted in the `finally` and their KV blocks freed at the engine's next step. A client
of a non-streaming request that hangs up is noticed the same way: `_outputs` also waits on the connection
and stops when it closes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine.sampling import SamplingParams
from ..errors import Qwen15Error
from .batch_engine import BatchEngine, Output, Sequence, TokenLogprob
from .json_mode import JSONConstraint
from .metrics import Metrics
from .protocol import APIError, ChatRequest, CompletionRequest, parse
from .tool_constraint import ToolCallConstraint
from .tools import TOOL_OPEN, forced_prefix, held_back, parse_tool_calls, prepare_messages, tool_names
from .tokenize import ROUTES as TOKENIZER_ROUTES
from .ui import ui_routes


log = logging.getLogger("qwen15.serve")


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    token_budget: int = 512
    kv_tokens: int = 32768
    block_size: int = 16
    ui: bool = True  # the chat page at / (serve/ui.py); --no-ui turns it off
    adapters: dict[str, str] = field(default_factory=dict)  # served name -> LoRA directory (already on the model)


@dataclass
class _State:
    llm: object
    config: ServerConfig
    engine: BatchEngine
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))


# ---- token text for logprobs ------------------------------------------------------------------------
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level map reversed: the printable stand-in character -> the byte it stands for."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTES = _byte_decoder()


def token_bytes(tokenizer, token: int) -> bytes:
    piece = tokenizer.id_to_token(token) or ""
    if piece and all(ch in _BYTES for ch in piece):
        return bytes(_BYTES[ch] for ch in piece)
    return piece.encode("utf-8")  # special / added tokens are stored as their text


def token_str(tokenizer, token: int) -> str:
    return token_bytes(tokenizer, token).decode("utf-8", errors="replace")


# ---- running sequences ------------------------------------------------------------------------------
class _ClientGone(Exception):
    """The client closed the connection before its (non-streaming) answer was ready."""


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body has been read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _outputs(state: _State, seqs: list[Sequence],
                   request: Request | None = None) -> AsyncIterator[list[tuple[int, Output]]]:
    """Submit the sequences; yield lists of (choice index, output) as the engine produces them.

    With request (non-streaming answers, where no write would fail), a client that hangs up raises
    _ClientGone, and the sequences are aborted like a streaming client's."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emitter(i: int):
        def emit(out: Output) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (i, out))
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass
        return emit

    for i, seq in enumerate(seqs):
        seq.emit = emitter(i)
        state.engine.submit(seq)
    pending = set(range(len(seqs)))
    gone = asyncio.ensure_future(_disconnected(request)) if request is not None else None
    try:
        while pending:
            if gone is None:
                batch = [await queue.get()]
            else:
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait((get, gone), return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    raise _ClientGone()
                batch = [get.result()]
            while not queue.empty():  # take everything already there: one write per wake-up, not per token
                batch.append(queue.get_nowait())
            for i, out in batch:
                if out.finish_reason is not None:
                    pending.discard(i)
                    _record_finish(state, seqs[i], out)
            yield batch
    finally:
        if gone is not None:
            gone.cancel()
        for i in pending:  # the client went away (or the handler failed): stop generating for it
            state.engine.abort(seqs[i].id)
            state.metrics.finished.labels("abort").inc()


def _record_finish(state: _State, seq: Sequence, out: Output) -> None:
    m = state.metrics
    m.finished.labels(out.finish_reason).inc()
    m.prompt_tokens.inc(out.prompt_tokens)
    m.generation_tokens.inc(out.completion_tokens)
    now = time.perf_counter()
    if seq.first_token_at is not None:
        m.ttft.observe(seq.first_token_at - seq.arrived)
    m.latency.observe(now - seq.arrived)
    if out.error:
        raise APIError(500, f"the engine failed on this request: {out.error}", type="server_error")


def _sequences(state: _State, req, prompt_ids: list[int], *, logprobs: int | None = None,
               prompt_logprobs: int | None = None, json_mode: bool = False, param: str = "messages",
               tool_call: tuple[set[str], str] | None = None) -> list[Sequence]:
    """One engine sequence per choice, after the context-window and queue checks.

    tool_call: (tool names, the call text forced so far) to constrain the answer to one valid call."""
    engine, ctx = state.engine, state.engine.context_length
    n_prompt = len(prompt_ids)
    if n_prompt == 0:
        raise APIError(400, "the prompt is empty: expected at least one token", param=param)
    vocab = state.llm.config.vocab_size
    if any(not 0 <= t < vocab for t in prompt_ids):
        raise APIError(400, f"prompt token ids must be in [0, {vocab})", param=param)
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
    limit = min(ctx, engine.kv_capacity_tokens)
    if n_prompt + (max_tokens or 0) > limit or n_prompt >= limit:
        asked = f"{n_prompt} in the prompt" + (f" + {max_tokens} max_tokens" if max_tokens else "")
        raise APIError(400, f"This model's maximum context length is {limit} tokens, but the request needs "
                            f"{asked}: shorten the prompt or lower max_tokens", param=param,
                       code="context_length_exceeded")
    max_new = max_tokens if max_tokens is not None else limit - n_prompt
    seqs = []
    for i in range(req.n):
        try:
            params = SamplingParams(
                temperature=req.temperature, top_k=max(req.top_k, 0), top_p=req.top_p, min_p=req.min_p,
                repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, max_tokens=max_new, stop=list(req.stop or []),
                seed=None if req.seed is None else req.seed + i, ignore_eos=req.ignore_eos)
        except Qwen15Error as e:
            raise APIError(400, str(e), param=str(e).split(" ")[0]) from None
        constraint = JSONConstraint(state.llm.tokenizer, engine.eos_ids) if json_mode else None
        if tool_call is not None:
            constraint = ToolCallConstraint(state.llm.tokenizer, engine.eos_ids, *tool_call)
        seqs.append(Sequence(list(prompt_ids), params, max_new, emit=None, logprobs=logprobs,
                             prompt_logprobs=prompt_logprobs, constraint=constraint,
                             adapter=_check_model(state, req.model)))
    return seqs


def _check_capacity(state: _State, n: int) -> None:
    if state.engine.queue_depth() + n > state.config.max_queue:
        raise APIError(429, f"the server queue is full ({state.config.max_queue} waiting): retry later",
                       type="rate_limit_error", code="queue_full")


def _check_model(state: _State, name: str) -> str | None:
    """The LoRA adapter a request's model name selects (None: the base model)."""
    if name in state.config.adapters:
        return name
    if name != state.config.model_name:
        served = ", ".join(repr(n) for n in [state.config.model_name, *state.config.adapters])
        raise APIError(404, f"the model '{name}' does not exist: this server serves {served}",
                       param="model", code="model_not_found")
    return None


async def _body(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---- chat ---------------------------------------------------------------------------------------------
def _chat_logprobs(state: _State, lps: list[TokenLogprob]) -> dict:
    tok = state.llm.tokenizer

    def entry(token, lp):
        return {"token": token_str(tok, token), "logprob": lp, "bytes": list(token_bytes(tok, token))}

    return {"content": [{**entry(x.token, x.logprob), "top_logprobs": [entry(t, v) for t, v in x.top]} for x in lps]}


class _ToolStream:
    """Streams content until a tool call starts; keeps the whole answer to parse calls at the end.

    An answer that opens with "{" may be a bare call object (see parse_tool_calls): it is held to the end too."""

    def __init__(self, prefix: str):
        self.full = prefix  # the whole answer, the forced prefix included
        self.emitted = len(prefix)  # full[:emitted] was sent as content (or is the forced prefix)
        self.holding = bool(prefix)  # a call (maybe) started: hold everything to the end

    def add(self, text: str) -> str:
        self.full += text
        if self.holding:
            return ""
        rest, nothing_sent = self.full[self.emitted:], not self.full[:self.emitted].strip()
        at = rest.find(TOOL_OPEN)
        if at < 0 and nothing_sent and rest.lstrip().startswith("{"):
            at = 0
        if at >= 0:
            self.holding = True
            return self._send(rest[:at])
        if nothing_sent and not rest.strip():
            return ""  # only whitespace so far: a bare call object may still start
        return self._send(rest[:len(rest) - held_back(rest)])

    def _send(self, piece: str) -> str:
        self.emitted += len(piece)
        return piece

    def unsent(self) -> str:
        return self.full[self.emitted:]


async def chat_completions(request: Request) -> Response:
    state: _State = request.app.state.qwen
    req = parse(ChatRequest, await _body(request))
    _check_model(state, req.model)
    tokenizer = state.llm.tokenizer
    tools = req.tools if req.tools and req.tool_choice != "none" else None
    try:
        prompt = tokenizer.apply_chat_template(prepare_messages(req.messages), add_generation_prompt=True, tools=tools)
    except Qwen15Error as e:
        raise APIError(400, f"invalid 'messages': {e}", param="messages") from None
    prefix = forced_prefix(req.tool_choice) if tools else ""
    names = tool_names(tools)
    json_mode = req.response_format is not None and req.response_format.type == "json_object"
    forced = prefix.startswith(TOOL_OPEN)  # required or named: the answer must be one valid call
    if forced and req.tool_choice == "required" and not names:
        raise APIError(400, "tool_choice 'required' needs at least one tool of type function with a name",
                       param="tools")
    seqs = _sequences(state, req, tokenizer.encode(prompt + prefix),
                      logprobs=(req.top_logprobs or 0) if req.logprobs else None, json_mode=json_mode and not forced,
                      tool_call=(names if req.tool_choice == "required" else {req.tool_choice["function"]["name"]},
                                 prefix[len(TOOL_OPEN):].lstrip("\n")) if forced else None)
    _check_capacity(state, len(seqs))
    request.scope["qwen15.seqs"] = (seqs, 1)  # for the access log line
    rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    base = {"id": rid, "created": created, "model": req.model}

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        streams = [_ToolStream(prefix) if tools else None for _ in seqs]
        completion = [0]

        def chunk(i, delta, finish=None, logprobs=None):
            return _sse({**base, "object": "chat.completion.chunk",
                         "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

        def chunks(i: int, out: Output):
            text = streams[i].add(out.text) if streams[i] else out.text
            lp = _chat_logprobs(state, out.logprobs) if seqs[i].logprobs is not None and out.logprobs else None
            if text or lp:
                yield chunk(i, {"content": text}, logprobs=lp)
            if out.finish_reason is None:
                return
            completion[0] += out.completion_tokens
            reason, s = out.finish_reason, streams[i]
            if s:
                _, calls = parse_tool_calls(s.full, names)
                if calls:
                    yield chunk(i, {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]})
                    reason = "tool_calls"
                elif s.unsent():  # held-back text, or a call that did not parse: send it as text
                    yield chunk(i, {"content": s.unsent()})
            yield chunk(i, {}, finish=reason)

        async def events():
            yield "".join(chunk(i, {"role": "assistant", "content": ""}) for i in range(len(seqs)))
            async for batch in _outputs(state, seqs):
                yield "".join(piece for i, out in batch for piece in chunks(i, out))
            if include_usage:
                yield _sse({**base, "object": "chat.completion.chunk", "choices": [],
                            "usage": _usage(len(seqs[0].prompt_ids), completion[0])})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    texts, lps = [""] * len(seqs), [[] for _ in seqs]
    finals: list[Output | None] = [None] * len(seqs)
    async for batch in _outputs(state, seqs, request):
        for i, out in batch:
            texts[i] += out.text
            lps[i] += out.logprobs
            if out.finish_reason is not None:
                finals[i] = out
    choices = []
    for i, out in enumerate(finals):
        message = {"role": "assistant", "content": texts[i]}
        reason = out.finish_reason
        if tools:
            content, calls = parse_tool_calls(prefix + texts[i], names)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                reason = "tool_calls"
        choices.append({"index": i, "message": message, "finish_reason": reason,
                        "logprobs": _chat_logprobs(state, lps[i]) if seqs[i].logprobs is not None else None})
    usage = _usage(len(seqs[0].prompt_ids), sum(o.completion_tokens for o in finals))
    return JSONResponse({**base, "object": "chat.completion", "choices": choices, "usage": usage})


# ---- completions ---------------------------------------------------------------------------------------
def _completion_logprobs(state: _State, lps: list[TokenLogprob | None], tokens: list[int], offset0: int) -> dict:
    """OpenAI's legacy shape: tokens, token_logprobs, top_logprobs (dicts), text_offset."""
    tok = state.llm.tokenizer
    decoder = tok.stream_decoder()
    offsets, pos = [], offset0
    for t in tokens:
        offsets.append(pos)
        pos += len(decoder.add(t))
    return {"tokens": [token_str(tok, t) for t in tokens],
            "token_logprobs": [None if x is None else x.logprob for x in lps],
            "top_logprobs": [None if x is None else {token_str(tok, t): v for t, v in x.top} for x in lps],
            "text_offset": offsets}


async def completions(request: Request) -> Response:
    state: _State = request.app.state.qwen
    req = parse(CompletionRequest, await _body(request))
    _check_model(state, req.model)
    tokenizer = state.llm.tokenizer
    p = req.prompt
    if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)):
        prompts = [p]
    elif isinstance(p, list) and p:
        prompts = list(p)
    else:
        raise APIError(400, "invalid 'prompt': expected a string, a list of strings or token ids", param="prompt")
    ids_list = [tokenizer.encode(x) if isinstance(x, str) else list(x) for x in prompts]
    want_prompt_lp = req.echo and req.logprobs is not None
    seqs = []
    for ids in ids_list:
        seqs += _sequences(state, req, ids, logprobs=req.logprobs, param="prompt",
                           prompt_logprobs=req.logprobs if want_prompt_lp else None)
    if req.stream and want_prompt_lp:
        raise APIError(400, "echo with logprobs is not supported with stream: set stream to false", param="stream")
    _check_capacity(state, len(seqs))
    request.scope["qwen15.seqs"] = (seqs, req.n)  # for the access log line
    rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
    base = {"id": rid, "object": "text_completion", "created": created, "model": req.model}
    prompt_texts = [x if isinstance(x, str) else tokenizer.decode(x) for x in prompts]

    def prompt_of(i):
        return prompt_texts[i // req.n]

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events():
            completion = 0
            if req.echo:
                for i in range(len(seqs)):
                    yield _sse({**base, "choices": [{"index": i, "text": prompt_of(i), "logprobs": None,
                                                     "finish_reason": None}]})
            async for batch in _outputs(state, seqs):
                events = []
                for i, out in batch:
                    lp = (_completion_logprobs(state, out.logprobs, out.token_ids, 0)
                          if req.logprobs is not None and out.logprobs else None)
                    if out.text or lp:
                        events.append(_sse({**base, "choices": [{"index": i, "text": out.text, "logprobs": lp,
                                                                 "finish_reason": None}]}))
                    if out.finish_reason is not None:
                        completion += out.completion_tokens
                        events.append(_sse({**base, "choices": [{"index": i, "text": "", "logprobs": None,
                                                                 "finish_reason": out.finish_reason}]}))
                yield "".join(events)
            if include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(sum(len(s.prompt_ids) for s in seqs[::req.n]),
                                                                   completion)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    texts, lps, gen_ids = [""] * len(seqs), [[] for _ in seqs], [[] for _ in seqs]
    finals: list[Output | None] = [None] * len(seqs)
    prompt_lps: list[list | None] = [None] * len(seqs)
    async for batch in _outputs(state, seqs, request):
        for i, out in batch:
            texts[i] += out.text
            lps[i] += out.logprobs
            gen_ids[i] += out.token_ids
            if out.prompt_logprobs is not None:
                prompt_lps[i] = out.prompt_logprobs
            if out.finish_reason is not None:
                finals[i] = out
    choices = []
    for i, seq in enumerate(seqs):
        echo_text = prompt_of(i) if req.echo else ""
        logprobs = None
        if req.logprobs is not None:
            if want_prompt_lp:
                logprobs = _completion_logprobs(state, (prompt_lps[i] or []) + lps[i], seq.prompt_ids + gen_ids[i], 0)
            else:
                logprobs = _completion_logprobs(state, lps[i], gen_ids[i], len(echo_text))
        choices.append({"index": i, "text": echo_text + texts[i], "logprobs": logprobs,
                        "finish_reason": finals[i].finish_reason})
    usage = _usage(sum(len(s.prompt_ids) for s in seqs[::req.n]), sum(o.completion_tokens for o in finals))
    return JSONResponse({**base, "choices": choices, "usage": usage})


# ---- the rest --------------------------------------------------------------------------------------------
async def models(request: Request) -> Response:
    state: _State = request.app.state.qwen
    base = {"id": state.config.model_name, "object": "model", "created": state.created, "owned_by": "qwen15"}
    # LoRA adapters as vLLM lists them: their own ids, the base as parent
    adapters = [{**base, "id": name, "root": str(path), "parent": state.config.model_name}
                for name, path in state.config.adapters.items()]
    return JSONResponse({"object": "list", "data": [base, *adapters]})


async def health(request: Request) -> Response:
    state: _State = request.app.state.qwen
    return JSONResponse({"status": "ok", "running": len(state.engine.running), "waiting": state.engine.queue_depth()})


async def metrics(request: Request) -> Response:
    state: _State = request.app.state.qwen
    return Response(state.metrics.render(state.engine), media_type="text/plain; version=0.0.4")


async def _api_error(request: Request, exc: APIError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                 code=kind).body(), status_code=exc.status_code)


async def _client_gone(request: Request, exc: _ClientGone) -> Response:
    return Response(status_code=499)  # nginx's "client closed request": nobody reads it, /metrics counts it


async def _server_error(request: Request, exc: Exception) -> Response:
    return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body(),
                        status_code=500)


ENDPOINTS = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics",
             *(path for path, _, _ in TOKENIZER_ROUTES))


def _access_line(scope, status: int, seconds: float) -> str:
    """`127.0.0.1 POST /v1/chat/completions 200 prompt=12 completion=5 0.123s` (tokens where it generated)."""
    client = (scope.get("client") or ("-",))[0]
    tokens = ""
    if "qwen15.seqs" in scope:
        seqs, n = scope["qwen15.seqs"]
        tokens = (f" prompt={sum(len(s.prompt_ids) for s in seqs[::n])}"
                  f" completion={sum(len(s.generated) for s in seqs)}")
    return f"{client} {scope['method']} {scope['path']} {status}{tokens} {seconds:.3f}s"


class _Guard:
    """API-key check on /v1/* and a request counter by endpoint and status (plain ASGI: streams pass through).

    Also logs one access line per request once its response is sent (a stream: when it ends)."""

    def __init__(self, app, state: _State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        path, start = scope["path"], time.perf_counter()
        try:
            key = self.state.config.api_key
            if key and path.startswith("/v1/"):
                auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
                if not secrets.compare_digest(auth, f"Bearer {key}"):
                    why = "missing API key: send 'Authorization: Bearer <key>'" if not auth else "incorrect API key"
                    err = APIError(401, why, code="invalid_api_key")
                    return await JSONResponse(err.body(), status_code=401)(scope, receive, send_status)
            await self.app(scope, receive, send_status)
        finally:
            self.state.metrics.requests.labels(path if path in ENDPOINTS else "other", str(status["code"])).inc()
            log.info("%s", _access_line(scope, status["code"], time.perf_counter() - start))


def create_app(llm, config: ServerConfig) -> Starlette:
    """The ASGI app serving llm; its engine thread starts and stops with the app's lifespan."""
    engine = BatchEngine(llm.model, llm.tokenizer, context_length=llm.context_length, max_batch=config.max_batch,
                         token_budget=config.token_budget, kv_tokens=config.kv_tokens, block_size=config.block_size)
    state = _State(llm, config, engine)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = Starlette(routes=[
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *(Route(path, handler, methods=[method]) for path, handler, method in TOKENIZER_ROUTES),  # vLLM's
        *(ui_routes() if config.ui else []),
    ], exception_handlers={APIError: _api_error, HTTPException: _http_error, _ClientGone: _client_gone,
                          Exception: _server_error},
        lifespan=lifespan)
    app.state.qwen = state
    app.add_middleware(_Guard, state=state)
    return app


def serve(llm, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run until SIGINT/SIGTERM; uvicorn then stops accepting, lets in-flight requests finish, and exits.

    log_level applies to our lines (access, stop); uvicorn's own stay at warning unless debug is asked,
    and its access log is off (ours has the tokens)."""
    import contextlib
    import signal
    import sys

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's own re-raises the signal after the graceful shutdown (exit status -15); a drained,
            # clean shutdown exits 0 instead.
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self.handle_exit)
            yield

    sys.setswitchinterval(0.001)  # the engine thread holds the GIL between torch ops: let the event loop in often
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("qwen15 serve: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(log_level.upper())
    app = create_app(llm, config)
    started = time.perf_counter()
    Server(uvicorn.Config(app, host=host, port=port, log_level="debug" if log_level == "debug" else
                          max(log_level, "warning", key=["debug", "info", "warning", "error"].index),
                          access_log=False, timeout_graceful_shutdown=300)).run()
    served = sum(s.value for m in app.state.qwen.metrics.requests.collect() for s in m.samples
                 if s.name.endswith("_total"))
    log.info("stopped after %.0fs, %d requests served", time.perf_counter() - started, served)
