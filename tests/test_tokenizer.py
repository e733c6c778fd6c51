"""Tokenizer: id parity with transformers' tokenizer loaded from the same GGUF, chat templates, streaming.

The reference is `AutoTokenizer.from_pretrained(dir, gguf_file=name)` (transformers' own GGUF converter),
and transformers' `apply_chat_template`. One deliberate difference: transformers' GGUF path builds the
tokenizer without a normalizer, while Qwen's tokenizer (its tokenizer.json, transformers' Qwen2Tokenizer
class, SPEC section 3) applies NFC first. So the parity property is `ours(x) == reference(NFC(x))`, and
the round trip is `decode(encode(x)) == NFC(x)` (identity for NFC text).
"""

import json
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen15.errors import TokenizerError
from qwen15.tokenizer import CHATML_TEMPLATE, Tokenizer
from qwen15.weights.gguf import open_gguf, read_metadata

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "don't won't I'LL we've THEY'RE she'd it's I'M You'Ve",
    "12345 3.14159 1,000,000 2024-04-25 ١٢٣ ４２",
    "你好，世界。通义千问是阿里巴巴开发的大语言模型。",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "สวัสดีชาวโลก ภาษาไทยไม่มีการเว้นวรรค",
    "こんにちは世界。カタカナとひらがなと漢字。",
    "안녕하세요 세계",
    "Emoji: 😀 👍🏽 👩‍👩‍👧‍👦 🧑🏿‍💻 🇨🇳 ❤️ 🐍",
    "def fibonacci(n):\n    if n < 2:\n        return n\n\treturn fibonacci(n - 1) + fibonacci(n - 2)\n",
    "class A:\n\tdef f(self):\n\t\tpass  # tab-indented\n\n\n",
    "x = {'a': [1, 2, 3]}  # comment\r\nprint(x)\r\n",
    "   leading spaces and trailing spaces   ",
    "\n\n\n   \n\t\t \n",
    "a  b   c    d\u00a0e\u3000f ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <tool_call>{\"name\": \"f\"}</tool_call><|fim_prefix|>x",
    "Ünïcödé façade naïve café résumé",
    "Mixed 中文 and English with numbers 42 and emoji 🎉!",
]

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "你好"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?"}],
]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "{\"temp\": 21}"},
]

# Characters that exercise the regex branches, plus special tokens, mixed into random unicode.
TRICKY = [*" \t\n\r\u00a0\u3000'0123456789sStTlLdDmMvVrReE.,!?-_()[]{}|#\"\\/",
          "中", "文", "😀", "👍", "\U0001F3FD", "\u200d", "\u0301", "\u0308", "é", "ا", "ก", "ー", "한", "\u1100",
          "<|im_end|>", "<|endoftext|>", "<tool_call>",
          "e\u0301", "A\u030a", "\u212b", "\u1100\u1161", "\u0915\u093c"]  # not NFC: normalisation must happen
# Cs can't be encoded; Cn (unassigned in Python's Unicode database) is left out so that Python's and the
# Rust library's Unicode versions can't disagree about NFC.
TEXT = st.lists(st.one_of(st.sampled_from(TRICKY), st.characters(exclude_categories=("Cs", "Cn"))),
                max_size=40).map("".join)
SLOW_FIXTURES = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def gguf_meta(real_gguf_path):
    return read_metadata(open_gguf(real_gguf_path))


@pytest.fixture(scope="module")
def ours(gguf_meta):
    return Tokenizer.from_gguf_metadata(gguf_meta)


@pytest.fixture(scope="module")
def reference(real_gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_gguf_path.parent, gguf_file=real_gguf_path.name)


@pytest.fixture(scope="module")
def saved_dir(reference, tmp_path_factory):
    """transformers' tokenizer saved as an HF checkpoint would be (tokenizer.json + config + .jinja)."""
    path = tmp_path_factory.mktemp("hf_tokenizer")
    reference.save_pretrained(path)
    return path


def ref_ids(reference, text):
    return reference(unicodedata.normalize("NFC", text)).input_ids


# ---- encode / decode parity with transformers -------------------------------------------------------
@pytest.mark.real_model
@pytest.mark.parametrize("text", CORPUS)
def test_ids_match_transformers(ours, reference, text):
    assert text == unicodedata.normalize("NFC", text)
    assert ours.encode(text) == reference(text).input_ids
    assert ours.decode(ours.encode(text)) == text
    assert ours.decode(ours.encode(text)) == reference.decode(reference(text).input_ids)


@pytest.mark.real_model
@settings(max_examples=200, **SLOW_FIXTURES)
@given(TEXT)
def test_random_text_parity_and_roundtrip(ours, reference, text):
    ids = ours.encode(text)
    assert ids == ref_ids(reference, text)
    assert ours.decode(ids) == unicodedata.normalize("NFC", text)  # the round trip holds up to NFC


@pytest.mark.real_model
def test_nfc_is_applied_unlike_transformers_gguf_path(ours, reference):
    # Qwen's tokenizer normalises to NFC; transformers' GGUF loader drops that normalizer.
    for text in ["cafe\u0301", "A\u030a", "\u212b", "\u1100\u1161"]:
        nfc = unicodedata.normalize("NFC", text)
        assert nfc != text
        assert ours.encode(text) == ours.encode(nfc) == reference(nfc).input_ids
        assert ours.decode(ours.encode(text)) == nfc
    assert reference.backend_tokenizer.normalizer is None  # if this fails, transformers fixed it: tighten above


@pytest.mark.real_model
def test_digits_and_contractions(ours):
    ids = ours.encode("12345")
    assert [ours.decode([i]) for i in ids] == list("12345")
    assert [ours.decode([i]) for i in ours.encode("don't")] == ["don", "'t"]
    # SPEC's regex: contractions are case-insensitive; digits one by one; a lone space before a digit.
    pieces = [p for p, _ in ours._tok.pre_tokenizer.pre_tokenize_str("I'LL don't 12")]
    assert pieces == ["I", "'LL", "Ġdon", "'t", "Ġ", "1", "2"]


@pytest.mark.real_model
def test_special_tokens_and_ids(ours, reference):
    assert ours.encode("<|im_start|>") == [151644]
    assert ours.encode("a<|im_end|><|endoftext|>") == [64, 151645, 151643]
    assert ours.token_to_id("<|im_end|>") == 151645 and ours.id_to_token(151644) == "<|im_start|>"
    assert ours.eos_token_ids == [151645, 151643]
    assert (ours.bos_token_id, ours.pad_token_id, ours.vocab_size) == (151643, 151643, 151936)
    # Control tokens are dropped by skip_special_tokens; user-defined <tool_call> is text (as in transformers).
    ids = ours.encode("<|im_start|>assistant\n<tool_call>{}</tool_call><|im_end|>")
    assert ours.decode(ids, skip_special_tokens=True) == "assistant\n<tool_call>{}</tool_call>"
    assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids) == reference.decode(ids)


@pytest.mark.real_model
def test_decode_accepts_tensors_and_rejects_bad_ids(ours):
    import torch

    ids = ours.encode("你好 world")
    assert ours.decode(torch.tensor(ids)) == "你好 world"
    with pytest.raises(TokenizerError, match="token id -1 to decode is negative"):
        ours.decode([1, -1])
    with pytest.raises(TokenizerError, match="sequence of integers"):
        ours.decode(["a"])


# ---- from_file (tokenizer.json + tokenizer_config.json + chat_template.jinja) ------------------------
@pytest.mark.real_model
def test_from_file_matches_gguf_tokenizer(ours, saved_dir):
    for source in (saved_dir, saved_dir / "tokenizer.json"):
        tok = Tokenizer.from_file(source)
        for text in CORPUS:
            assert tok.encode(text) == ours.encode(text)
            ids = ours.encode(text)
            assert tok.decode(ids, skip_special_tokens=True) == ours.decode(ids, skip_special_tokens=True)
        assert tok.has_own_chat_template and tok.chat_template == ours.chat_template  # from chat_template.jinja
        for messages in CHATS:
            assert tok.apply_chat_template(messages) == ours.apply_chat_template(messages)
        assert tok.eos_token_ids == [151645, 151643]
        assert (tok.bos_token_id, tok.pad_token_id) == (151643, 151643)


# ---- chat templates --------------------------------------------------------------------------------
@pytest.mark.real_model
@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gguf_chat_template_matches_transformers(ours, reference, messages, add_generation_prompt):
    assert ours.has_own_chat_template
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    if messages[0]["role"] != "system":  # Qwen2.5's template, not the ChatML fallback, was rendered
        assert "You are Qwen, created by Alibaba Cloud." in expected


@pytest.mark.real_model
def test_gguf_chat_template_with_tools_matches_transformers(ours, reference):
    expected = reference.apply_chat_template(TOOL_CHAT, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    got = ours.apply_chat_template(TOOL_CHAT, tools=TOOLS)
    assert got == expected
    assert '"name": "get_weather"' in got and "<tool_response>" in got and "<tools>" in got


ENV_TEMPLATE = """{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m.role == 'user' %}
        {% set ns.n = ns.n + 1 %}
U{{ ns.n }}: {{ m.content | tojson }}
    {% elif m.role == 'stop' %}
        {% break %}
    {% else %}
A: {{ {'text': m.content, 'list': [1, 2]} | tojson(indent=2) }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
A:{% endif %}"""


def test_template_environment_matches_transformers(tiny_tokenizer):
    # trim_blocks/lstrip_blocks, an un-escaping tojson, loop controls, namespace, eos_token: as transformers.
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": "user", "content": "<a href='x'>&é 中"}, {"role": "assistant", "content": "ok\n"},
                {"role": "user", "content": "2"}, {"role": "stop", "content": ""}, {"role": "user", "content": "x"}]
    tok = Tokenizer(tiny_tokenizer._tok, chat_template=ENV_TEMPLATE, eos_token_ids=[3])
    for add in (True, False):
        expected, _ = render_jinja_template(conversations=[messages], chat_template=ENV_TEMPLATE,
                                            add_generation_prompt=add, eos_token="<|im_end|>")
        assert tok.apply_chat_template(messages, add_generation_prompt=add) == expected[0]
    assert '"<a href=\'x\'>&é 中"' in expected[0] and "U3" not in expected[0]


def chatml(messages, system="You are a helpful assistant."):
    """Qwen1.5's published ChatML format, built directly from its rule (SPEC section 3)."""
    out = "" if messages[0]["role"] == "system" else f"<|im_start|>system\n{system}<|im_end|>\n"
    for m in messages:
        out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return out + "<|im_start|>assistant\n"


TINY_META = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab", "<|im_end|>", "<x>"],
             "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.token_type": [1, 1, 1, 3, 4]}


@pytest.fixture
def tiny_tokenizer():
    return Tokenizer.from_gguf_metadata(dict(TINY_META))


@pytest.mark.parametrize("messages", CHATS)
def test_chatml_fallback_follows_qwen15_format(messages, tiny_tokenizer):
    assert not tiny_tokenizer.has_own_chat_template
    assert tiny_tokenizer.chat_template == CHATML_TEMPLATE
    assert tiny_tokenizer.apply_chat_template(messages) == chatml(messages)
    assert tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=False) == chatml(messages)[
        : -len("<|im_start|>assistant\n")]


def test_chatml_exact_string(tiny_tokenizer):
    assert tiny_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_tiny_gguf_vocab_merges_and_token_types(tiny_tokenizer):
    assert tiny_tokenizer.encode("abab") == [2, 2]
    assert tiny_tokenizer.encode("ab<|im_end|><x>") == [2, 3, 4]
    assert tiny_tokenizer.decode([2, 3, 4], skip_special_tokens=True) == "ab<x>"  # type 4 is not special
    assert tiny_tokenizer.eos_token_ids == [3]


def _tiny_dir(tmp_path, tiny_tokenizer, **files):
    tiny_tokenizer._tok.save(str(tmp_path / "tokenizer.json"))
    for name, content in files.items():
        (tmp_path / name.replace("__", ".")).write_text(content if isinstance(content, str) else json.dumps(content))
    return tmp_path


def test_from_file_reads_config_template_eos_and_added_tokens(tmp_path):
    meta = dict(TINY_META, **{"tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.token_type": [1, 1, 1]})
    base = Tokenizer.from_gguf_metadata(meta)
    config = {"chat_template": "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{{ eos_token }}",
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "added_tokens_decoder": {"3": {"content": "<|endoftext|>", "special": True},
                                       "4": {"content": "<|im_end|>", "special": True},
                                       "5": {"content": "<tool_call>", "special": False}}}
    d = _tiny_dir(tmp_path, base, tokenizer_config__json=config,
                  generation_config__json={"bos_token_id": 3, "eos_token_id": [4, 3]})
    tok = Tokenizer.from_file(d)
    assert tok.encode("ab<|im_end|><tool_call>") == [2, 4, 5]
    assert tok.decode([2, 3, 4, 5], skip_special_tokens=True) == "ab<tool_call>"
    assert (tok.eos_token_ids, tok.bos_token_id, tok.pad_token_id) == ([4, 3], 3, 3)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[user]x<|im_end|>"
    (d / "chat_template.jinja").write_text("J{{ messages[0]['content'] }}")  # the .jinja file wins
    assert Tokenizer.from_file(d).apply_chat_template([{"role": "user", "content": "x"}]) == "Jx"


def test_from_file_without_template_falls_back_to_chatml(tmp_path, tiny_tokenizer):
    tok = Tokenizer.from_file(_tiny_dir(tmp_path, tiny_tokenizer) / "tokenizer.json")
    assert not tok.has_own_chat_template
    assert tok.apply_chat_template(CHATS[2]) == chatml(CHATS[2])


# ---- streaming -------------------------------------------------------------------------------------
def stream(tokenizer, ids, skip=False):
    decoder = tokenizer.stream_decoder(skip_special_tokens=skip)
    return [decoder.add(i) for i in ids] + [decoder.flush()]


@pytest.mark.real_model
@pytest.mark.parametrize("text", ["中文和 emoji 🐍👩‍👩‍👧 混合 ٱلسَّلَامُ ข้อความ", "👍🏽🧑🏿‍💻🇨🇳 漢字かな<|im_end|>한국어"])
def test_stream_decoder_never_splits_characters(ours, text):
    ids = ours.encode(text)
    assert sum(1 for i in ids if "\ufffd" in ours.decode([i])) > 0  # the text does split characters
    for skip in (False, True):
        pieces = stream(ours, ids, skip)
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) == ours.decode(ids, skip_special_tokens=skip)
    assert "".join(stream(ours, ids)) == text


@pytest.mark.real_model
@settings(max_examples=100, **SLOW_FIXTURES)
@given(TEXT)
def test_stream_decoder_property_on_text(ours, text):
    ids = ours.encode(text)
    pieces = stream(ours, ids)
    assert "".join(pieces) == ours.decode(ids)
    # No replacement character is made up: only those the text itself holds come out.
    assert sum(p.count("\ufffd") for p in pieces) == unicodedata.normalize("NFC", text).count("\ufffd")


@pytest.mark.real_model
@settings(max_examples=100, **SLOW_FIXTURES)
@given(st.lists(st.one_of(st.integers(0, 255), st.integers(0, 151935)), max_size=30), st.booleans())
def test_stream_decoder_property_on_arbitrary_ids(ours, ids, skip):
    # Arbitrary ids include lone UTF-8 lead/continuation bytes: the join must still equal decode.
    assert "".join(stream(ours, ids, skip)) == ours.decode(ids, skip_special_tokens=skip)


# ---- errors ----------------------------------------------------------------------------------------
def test_gguf_errors():
    with pytest.raises(TokenizerError, match="unsupported GGUF tokenizer model 'llama'"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "llama"})
    with pytest.raises(TokenizerError, match="unsupported GGUF tokenizer model None"):
        Tokenizer.from_gguf_metadata({})
    with pytest.raises(TokenizerError, match="no tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(TokenizerError, match="merge 'abc'.*two tokens"):
        Tokenizer.from_gguf_metadata(dict(TINY_META, **{"tokenizer.ggml.merges": ["abc"]}))
    with pytest.raises(TokenizerError, match="token_type has 2 entries but there are 5 tokens"):
        Tokenizer.from_gguf_metadata(dict(TINY_META, **{"tokenizer.ggml.token_type": [1, 1]}))


def test_file_errors(tmp_path, tiny_tokenizer):
    with pytest.raises(TokenizerError, match="/nonexistent/dir/tokenizer.json: tokenizer.json not found"):
        Tokenizer.from_file("/nonexistent/dir/tokenizer.json")
    with pytest.raises(TokenizerError, match="tokenizer.json not found"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path)
    d = _tiny_dir(tmp_path, tiny_tokenizer, tokenizer_config__json="{oops")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.from_file(d)
    d = _tiny_dir(tmp_path, tiny_tokenizer,
                  tokenizer_config__json={"added_tokens_decoder": {"9": {"content": "<new>"}}})
    with pytest.raises(TokenizerError, match="added token '<new>' should have id 9"):
        Tokenizer.from_file(d)


@pytest.mark.parametrize("messages, message", [
    ("hello", "messages must be a non-empty list.*got str"),
    ([], r"got list \(empty\)"),
    (["hi"], r"messages\[0\] must be an object with 'role' and 'content', got str"),
    ([{"role": "user", "content": "a"}, {"content": "b"}], r"messages\[1\] has no string 'role'"),
    ([{"role": "user", "content": 5}], r"messages\[0\].content must be a string, got int"),
    ([{"role": "user"}], r"messages\[0\] has no 'content' string"),
])
def test_bad_messages_are_named(tiny_tokenizer, messages, message):
    with pytest.raises(TokenizerError, match=message) as info:
        tiny_tokenizer.apply_chat_template(messages)
    assert "\n" not in str(info.value)


def test_template_errors(tmp_path, tiny_tokenizer):
    with pytest.raises(TokenizerError, match="tools must be a list"):
        tiny_tokenizer.apply_chat_template(CHATS[0], tools={"name": "f"})
    strict = Tokenizer(tiny_tokenizer._tok, chat_template="{{ raise_exception('only user turns') }}")
    with pytest.raises(TokenizerError, match="chat template refused the messages: only user turns"):
        strict.apply_chat_template(CHATS[0])
    with pytest.raises(TokenizerError, match="chat template does not parse"):
        Tokenizer(tiny_tokenizer._tok, chat_template="{% for %}").apply_chat_template(CHATS[0])
    escape = Tokenizer(tiny_tokenizer._tok, chat_template="{% set ns = namespace() %}{% set ns._x = 1 %}")
    with pytest.raises(TokenizerError, match="namespace attribute '_x'"):
        escape.apply_chat_template(CHATS[0])
    sandboxed = Tokenizer(tiny_tokenizer._tok, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(TokenizerError, match="failed to render"):
        sandboxed.apply_chat_template(CHATS[0])
