"""vLLM's tokenizer endpoints: /tokenize, /detokenize, /tokenizer_info.

Clients that count tokens on their side use them instead of loading the model's tokenizer themselves:
lm-evaluation-harness's `local-completions` looks for /tokenizer_info and /tokenize and, when they answer,
tokenizes through the server (its "remote" tokenizer), so it runs against `qwen15 serve` offline, with
exactly the server's token ids. Request and response shapes are vLLM's.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import Qwen15Error
from .protocol import APIError, parse


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True  # Qwen's tokenizer adds no BOS either way


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    tokens: list[int]


async def _json(request: Request):
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


async def tokenize(request: Request) -> Response:
    state = request.app.state.qwen
    req = parse(TokenizeRequest, await _json(request))
    tok = state.llm.tokenizer
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "expected exactly one of 'prompt' (a string) or 'messages' (a chat)", param="prompt")
    if req.prompt is not None:
        text = req.prompt
    else:
        try:
            text = tok.apply_chat_template(req.messages, add_generation_prompt=req.add_generation_prompt)
        except Qwen15Error as e:
            raise APIError(400, f"invalid 'messages': {e}", param="messages") from None
    ids = tok.encode(text)
    return JSONResponse({"count": len(ids), "max_model_len": state.engine.context_length, "tokens": ids,
                         "token_strs": None})


async def detokenize(request: Request) -> Response:
    state = request.app.state.qwen
    req = parse(DetokenizeRequest, await _json(request))
    tok = state.llm.tokenizer
    vocab = state.llm.config.vocab_size
    if any(not 0 <= t < vocab for t in req.tokens):
        raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
    return JSONResponse({"prompt": tok.decode(req.tokens)})


async def tokenizer_info(request: Request) -> Response:
    tok = request.app.state.qwen.llm.tokenizer

    def name(i: int | None) -> str | None:
        return None if i is None else tok.id_to_token(i)

    eos = tok.eos_token_ids[0] if tok.eos_token_ids else None
    return JSONResponse({"tokenizer_class": "Qwen2TokenizerFast", "eos_token": name(eos),
                         "bos_token": name(tok.bos_token_id), "pad_token": name(tok.pad_token_id),
                         "chat_template": tok.chat_template,
                         "model_max_length": request.app.state.qwen.engine.context_length})


ROUTES = (("/tokenize", tokenize, "POST"), ("/detokenize", detokenize, "POST"), ("/tokenizer_info", tokenizer_info, "GET"))
