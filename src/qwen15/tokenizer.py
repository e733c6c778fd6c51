"""Byte-level BPE through the `tokenizers` library, chat templates through jinja2, streaming decode.

Built from a `tokenizer.json` (HF checkpoints) or from a GGUF's vocabulary and merges with the Qwen
pre-tokenizer (SPEC section 3). The chat template is the checkpoint's own; without one, Qwen1.5's ChatML.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .errors import TokenizerError

# Digits split one by one; letters grouped with one optional leading non-letter (SPEC section 3).
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen1.5-Chat's template (ChatML with a default system turn), used when a checkpoint ships none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHAT_EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_GGUF_SPECIAL_TYPES = (3, 4)


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, *, chat_template: str | None = None,
                 eos_token_ids: list[int] | None = None, bos_token_id: int | None = None,
                 pad_token_id: int | None = None, vocab_size: int | None = None):
        self._tok = tokenizer
        self.chat_template = chat_template or CHATML_TEMPLATE
        self.has_own_chat_template = chat_template is not None
        self.bos_token_id = bos_token_id
        self.pad_token_id = pad_token_id
        self.vocab_size = vocab_size or tokenizer.get_vocab_size(with_added_tokens=True)
        ids = list(eos_token_ids or [])
        # Chat models end a turn with <|im_end|>; base models with <|endoftext|>: stop on both.
        for name in CHAT_EOS_TOKENS:
            tid = tokenizer.token_to_id(name)
            if tid is not None and tid not in ids:
                ids.append(tid)
        self.eos_token_ids = ids
        self._template = None

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "Tokenizer":
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise TokenizerError(f"unsupported GGUF tokenizer model {kind!r}: expected 'gpt2' (byte-level BPE)")
        tokens = meta.get("tokenizer.ggml.tokens")
        merges = meta.get("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise TokenizerError("GGUF has no tokenizer.ggml.tokens / tokenizer.ggml.merges: cannot build the tokenizer")
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {tok: i for i, tok in enumerate(tokens)}
        special = [tok for tok, t in zip(tokens, types) if t in _GGUF_SPECIAL_TYPES]
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, unk_token=None,
                                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                     byte_fallback=False))
        _set_qwen_pipeline(tok)
        # Special tokens match whole in text; being in the vocab already, they keep their GGUF ids.
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        for t in special:
            if tok.token_to_id(t) != vocab[t]:
                raise TokenizerError(f"GGUF special token {t!r} has id {vocab[t]} but landed at {tok.token_to_id(t)}")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(tok, chat_template=meta.get("tokenizer.chat_template"),
                   eos_token_ids=[eos] if eos is not None else None,
                   bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                   pad_token_id=meta.get("tokenizer.ggml.padding_token_id"), vocab_size=len(tokens))

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """From `tokenizer.json` (or its directory, also reading tokenizer_config.json and generation_config.json)."""
        path = Path(path)
        directory = path if path.is_dir() else path.parent
        file = directory / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"{file}: tokenizer.json not found")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:
            raise TokenizerError(f"{file}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        config = _read_json(directory / "tokenizer_config.json")
        generation = _read_json(directory / "generation_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        eos: list[int] = []
        gen_eos = generation.get("eos_token_id")
        eos += gen_eos if isinstance(gen_eos, list) else ([gen_eos] if gen_eos is not None else [])
        eos_token = config.get("eos_token")
        if isinstance(eos_token, dict):
            eos_token = eos_token.get("content")
        if isinstance(eos_token, str) and tok.token_to_id(eos_token) is not None:
            eos.append(tok.token_to_id(eos_token))
        pad = config.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        return cls(tok, chat_template=template, eos_token_ids=list(dict.fromkeys(eos)),
                   bos_token_id=generation.get("bos_token_id"),
                   pad_token_id=tok.token_to_id(pad) if isinstance(pad, str) else None)

    # ---- encode / decode --------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of text; special tokens written in the text are recognised; no BOS (Qwen adds none)."""
        if not isinstance(text, str):
            raise TokenizerError(f"text to encode must be a string, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    # ---- chat -------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **extra: Any) -> str:
        _check_messages(messages)
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=tools, **extra)
        except TokenizerError:
            raise
        except Exception as e:
            raise TokenizerError(f"chat template failed to render: {type(e).__name__}: {e}") from None


class StreamDecoder:
    """Incremental detokenizer: add one id at a time, get back only whole characters.

    Byte-level BPE splits a multi-byte character (CJK, emoji) across tokens; the decoded tail then ends
    in U+FFFD until the rest arrives, so that tail is held back.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids before this are done; decoding restarts here for context
        self.read_offset = 0  # ids before this have been emitted as text

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = decode(self.ids[self.prefix_offset:], self.skip)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # an incomplete character: wait for the next token
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end comes out as U+FFFD)."""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = decode(self.ids[self.prefix_offset:], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]


def _set_qwen_pipeline(tok: HFTokenizer) -> None:
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise TokenizerError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TokenizerError(f"messages[{i}] must be an object with 'role' and 'content', got {type(m).__name__}")
        if not isinstance(m.get("role"), str):
            raise TokenizerError(f"messages[{i}] has no string 'role'")
        content = m.get("content")
        if content is not None and not isinstance(content, str) and not (
                isinstance(content, list) and all(isinstance(p, dict) for p in content)):
            raise TokenizerError(f"messages[{i}].content must be a string, got {type(content).__name__}")


def _compile_template(source: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TokenizerError(f"chat template refused the messages: {message}")

    def tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)

    # The same environment settings transformers uses, so templates render identically.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise TokenizerError(f"chat template does not parse: {e}") from None
