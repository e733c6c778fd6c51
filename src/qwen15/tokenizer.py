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

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen1.5-Chat's template (ChatML with a default system turn), used when a checkpoint ships none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Chat models end a turn with <|im_end|>, base models the text with <|endoftext|>: stop on both (SPEC 3).
CHAT_EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4
GGUF_TOKENIZER_MODELS = ("gpt2",)


class Tokenizer:
    """A Qwen tokenizer: `encode`/`decode`, eos/bos/pad ids, the chat template and a streaming decoder.

    Build it with `Tokenizer.from_file(path)` (tokenizer.json or an HF checkpoint directory) or
    `Tokenizer.from_gguf_metadata(meta)`.
    """

    def __init__(self, tokenizer: HFTokenizer, *, chat_template: str | None = None,
                 eos_token_ids: list[int] | None = None, bos_token_id: int | None = None,
                 pad_token_id: int | None = None, vocab_size: int | None = None):
        self._tok = tokenizer
        self.chat_template: str = chat_template or CHATML_TEMPLATE
        self.has_own_chat_template = bool(chat_template)
        self.bos_token_id = bos_token_id
        self.pad_token_id = pad_token_id
        # Entries in the vocabulary (GGUF: every listed token, padding rows included).
        self.vocab_size: int = vocab_size or tokenizer.get_vocab_size(with_added_tokens=True)
        ids = [int(i) for i in (eos_token_ids or [])]
        for name in CHAT_EOS_TOKENS:
            tid = tokenizer.token_to_id(name)
            if tid is not None and tid not in ids:
                ids.append(tid)
        self.eos_token_ids: list[int] = ids
        self._template = None

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "Tokenizer":
        """Byte-level BPE from `tokenizer.ggml.tokens` / `.merges` (as `read_metadata` returns them)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind not in GGUF_TOKENIZER_MODELS:
            raise TokenizerError(f"unsupported GGUF tokenizer model {kind!r} (tokenizer.ggml.model): "
                                 f"expected 'gpt2' (byte-level BPE)")
        tokens = meta.get("tokenizer.ggml.tokens")
        merges = meta.get("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise TokenizerError("GGUF has no tokenizer.ggml.tokens / tokenizer.ggml.merges: cannot build the tokenizer")
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if len(types) != len(tokens):
            raise TokenizerError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries but there are "
                                 f"{len(tokens)} tokens: expected one type per token")
        vocab = {tok: i for i, tok in enumerate(tokens)}
        pairs = []
        for m in merges:
            parts = m.split(" ")
            if len(parts) != 2:
                raise TokenizerError(f"GGUF merge {m!r} (tokenizer.ggml.merges): expected two tokens separated by one space")
            pairs.append((parts[0], parts[1]))
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, unk_token=None,
                                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                     byte_fallback=False))
        _set_qwen_pipeline(tok)
        # Control tokens (<|im_end|>, ...) are special: matched whole in text, dropped by
        # decode(skip_special_tokens=True). User-defined ones (<tool_call>) are matched whole but are
        # text (Qwen2.5's tokenizer_config marks them special=false), so they survive skip_special_tokens.
        control = [t for t, ty in zip(tokens, types) if ty == GGUF_CONTROL]
        user = [t for t, ty in zip(tokens, types) if ty == GGUF_USER_DEFINED]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
        for t in control + user:  # being in the vocab already, they must keep their GGUF ids
            if tok.token_to_id(t) != vocab[t]:
                raise TokenizerError(f"GGUF added token {t!r} has id {vocab[t]} but landed at {tok.token_to_id(t)}")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(tok, chat_template=meta.get("tokenizer.chat_template"),
                   eos_token_ids=[eos] if eos is not None else None,
                   bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                   pad_token_id=meta.get("tokenizer.ggml.padding_token_id"), vocab_size=len(tokens))

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """From `tokenizer.json`, or an HF checkpoint directory holding it.

        Beside it, `tokenizer_config.json` gives the chat template, added tokens, eos / bos / pad,
        `chat_template.jinja` (how transformers >= 4.43 saves templates) overrides its template, and
        `generation_config.json` gives the eos / bos ids generation stops on.
        """
        path = Path(path)
        directory = path if path.is_dir() else path.parent
        file = directory / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"{file}: tokenizer.json not found")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:
            raise TokenizerError(f"{file}: not a valid tokenizer.json ({_first_line(e)})") from None
        config = _read_json(directory / "tokenizer_config.json")
        generation = _read_json(directory / "generation_config.json")
        _add_config_tokens(tok, config, directory / "tokenizer_config.json")

        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
        jinja_file = directory / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        elif not template:
            template = _read_json(directory / "chat_template.json").get("chat_template")
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{directory / 'tokenizer_config.json'}: chat_template must be a string")

        def token_id(entry: Any) -> int | None:
            entry = entry.get("content") if isinstance(entry, dict) else entry
            return tok.token_to_id(entry) if isinstance(entry, str) else None

        eos: list[int] = []
        gen_eos = generation.get("eos_token_id")
        eos += gen_eos if isinstance(gen_eos, list) else ([gen_eos] if gen_eos is not None else [])
        if token_id(config.get("eos_token")) is not None:
            eos.append(token_id(config.get("eos_token")))
        bos = generation.get("bos_token_id")
        return cls(tok, chat_template=template or None, eos_token_ids=list(dict.fromkeys(eos)),
                   bos_token_id=bos if bos is not None else token_id(config.get("bos_token")),
                   pad_token_id=token_id(config.get("pad_token")))

    # ---- encode / decode --------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of text; special tokens written in the text are recognised; no BOS (Qwen adds none)."""
        if not isinstance(text, str):
            raise TokenizerError(f"text to encode must be a string, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of token ids (a list, tuple or 1-D tensor/array); ids outside the vocabulary decode to ''."""
        try:
            ids = [int(i) for i in ids]
        except (TypeError, ValueError):
            raise TokenizerError(f"token ids to decode must be a sequence of integers, got {type(ids).__name__}") from None
        if any(i < 0 for i in ids):
            raise TokenizerError(f"token id {min(ids)} to decode is negative: expected ids in [0, {self.vocab_size})")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    # ---- chat -------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **extra: Any) -> str:
        """The prompt text for a conversation, rendered by the checkpoint's own template (else ChatML).

        Renders like transformers' `apply_chat_template(..., tokenize=False)`: same jinja settings, and
        the special tokens (`bos_token`, `eos_token`, `pad_token`) visible to the template; `extra`
        keyword arguments (e.g. `enable_thinking`) are passed through.
        """
        _check_messages(messages)
        if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
            raise TokenizerError(f"tools must be a list of JSON-schema objects, got {type(tools).__name__}")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        context = {name: self._tok.id_to_token(i) for name, i in
                   (("bos_token", self.bos_token_id), ("pad_token", self.pad_token_id),
                    ("eos_token", self.eos_token_ids[0] if self.eos_token_ids else None)) if i is not None}
        context.update(extra)
        try:
            return self._template.render(messages=_plain(messages), tools=_plain(tools),
                                         add_generation_prompt=add_generation_prompt, **_plain(context))
        except TokenizerError:
            raise
        except Exception as e:
            raise TokenizerError(f"chat template failed to render: {type(e).__name__}: {_first_line(e)}") from None


class StreamDecoder:
    """Incremental detokenizer: `add(id)` one token at a time, get back only whole characters.

    Byte-level BPE splits a multi-byte character (CJK, emoji) across tokens; the decoded tail then ends
    in U+FFFD until the rest arrives, so that tail is held back. `''.join(pieces) + flush()` equals
    `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids before this are done; decoding restarts here for context
        self.read_offset = 0  # ids before this have been emitted as text

    def add(self, token_id: int) -> str:
        """The new text this token completes ('' while a character is still incomplete)."""
        self.ids.append(int(token_id))
        prefix, full = self._window()
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # an incomplete character (or nothing new): wait for the next token
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    __call__ = add

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end comes out as U+FFFD)."""
        prefix, full = self._window()
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]

    def _window(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        return (decode(self.ids[self.prefix_offset:self.read_offset], self.skip),
                decode(self.ids[self.prefix_offset:], self.skip))


def _set_qwen_pipeline(tok: HFTokenizer) -> None:
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()


def _add_config_tokens(tok: HFTokenizer, config: dict, where: Path) -> None:
    """Added tokens listed in tokenizer_config.json's `added_tokens_decoder` but missing from tokenizer.json."""
    table = config.get("added_tokens_decoder")
    if not isinstance(table, dict):
        return
    for key, entry in sorted(table.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else -1):
        if not str(key).isdigit() or not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise TokenizerError(f"{where}: added_tokens_decoder entry {key!r}: expected an id and an object with 'content'")
        content, want = entry["content"], int(key)
        if tok.token_to_id(content) is not None:
            continue
        added = AddedToken(content, single_word=bool(entry.get("single_word", False)),
                           lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
                           normalized=bool(entry.get("normalized", False)), special=bool(entry.get("special", True)))
        (tok.add_special_tokens if added.special else tok.add_tokens)([added])
        if tok.token_to_id(content) != want:
            raise TokenizerError(f"{where}: added token {content!r} should have id {want} but tokenizer.json "
                                 f"puts it at {tok.token_to_id(content)}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({_first_line(e)})") from None
    return data if isinstance(data, dict) else {}


def _check_messages(messages: Any) -> None:
    """A non-empty list of {'role': str, 'content': str} (content may be a list of parts, or absent
    on an assistant turn that carries tool_calls)."""
    if not isinstance(messages, list) or not messages:
        raise TokenizerError(f"messages must be a non-empty list of {{'role': ..., 'content': ...}} objects, "
                             f"got {type(messages).__name__}" + (" (empty)" if isinstance(messages, list) else ""))
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TokenizerError(f"messages[{i}] must be an object with 'role' and 'content', got {type(m).__name__}")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise TokenizerError(f"messages[{i}] has no string 'role'")
        content = m.get("content")
        if content is None:
            if not m.get("tool_calls"):
                raise TokenizerError(f"messages[{i}] has no 'content' string")
        elif not isinstance(content, str) and not (isinstance(content, list) and all(isinstance(p, dict) for p in content)):
            raise TokenizerError(f"messages[{i}].content must be a string, got {type(content).__name__}")


def _plain(value: Any) -> Any:
    """A copy built of plain JSON types only, so the template sees no object with methods of its own."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    raise TokenizerError(f"chat template input of type {type(value).__name__} is not JSON data: "
                         f"expected str, number, bool, None, list or dict")


def _compile_template(source: str):
    from datetime import datetime

    import jinja2
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TokenizerError(f"chat template refused the messages: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers (and so every Qwen template) expects plain JSON.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class Namespace(jinja2.utils.Namespace):
        # `{% set ns.__x__ = ... %}` would bypass the sandbox's attribute checks: refuse underscore names.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat template may not set namespace attribute {name!r}")

    # The same environment settings transformers uses, so templates render identically.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["namespace"] = Namespace
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise TokenizerError(f"chat template does not parse: {_first_line(e)}") from None
