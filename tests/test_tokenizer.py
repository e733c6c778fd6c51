"""Tokenizer parity with transformers' tokenizer loaded from the same GGUF, chat templates, streaming."""

import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen15.errors import TokenizerError
from qwen15.tokenizer import CHATML_TEMPLATE, Tokenizer
from qwen15.weights.gguf import open_gguf, read_metadata

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "don't won't I'LL we've THEY'RE she'd it's",
    "12345 3.14159 1,000,000 2024-04-25",
    "你好，世界。通义千问是阿里巴巴开发的大语言模型。",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "สวัสดีชาวโลก ภาษาไทยไม่มีการเว้นวรรค",
    "こんにちは世界。カタカナとひらがなと漢字。",
    "안녕하세요 세계",
    "Emoji: 😀 👍🏽 👩‍👩‍👧‍👦 🇨🇳 ❤️ 🐍",
    "def fibonacci(n):\n    if n < 2:\n        return n\n\treturn fibonacci(n - 1) + fibonacci(n - 2)\n",
    "x = {'a': [1, 2, 3]}  # comment\r\nprint(x)\r\n",
    "   leading spaces and trailing spaces   ",
    "\n\n\n   \n\t\t \n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more",
    "Ünïcödé façade naïve café résumé",
    "Mixed 中文 and English with numbers 42 and emoji 🎉!",
]

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "你好"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?"}],
]


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


@pytest.mark.real_model
@pytest.mark.parametrize("text", CORPUS)
def test_ids_match_transformers(ours, reference, text):
    assert ours.encode(text) == reference(text).input_ids
    assert ours.decode(ours.encode(text)) == text


@pytest.mark.real_model
def test_digits_split_one_by_one(ours):
    ids = ours.encode("12345")
    assert len(ids) == 5 and [ours.decode([i]) for i in ids] == list("12345")


@pytest.mark.real_model
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_random_text_parity_and_roundtrip(ours, reference, text):
    # The normalizer is NFC, so decode(encode(x)) == x holds for NFC text (both tokenizers apply it).
    assert ours.encode(text) == reference(text).input_ids
    nfc = unicodedata.normalize("NFC", text)
    assert ours.decode(ours.encode(nfc)) == nfc


@pytest.mark.real_model
def test_special_tokens_and_eos(ours):
    assert ours.encode("<|im_start|>") == [151644]
    assert ours.encode("<|im_end|><|endoftext|>") == [151645, 151643]
    assert ours.eos_token_ids == [151645, 151643]
    assert ours.decode([151644, 9707], skip_special_tokens=True) == ours.decode([9707])


@pytest.mark.real_model
@pytest.mark.parametrize("messages", CHATS)
def test_gguf_chat_template_matches_transformers(ours, reference, messages):
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == expected


@pytest.mark.real_model
def test_from_file_matches_gguf_tokenizer(ours, reference, tmp_path):
    reference.save_pretrained(tmp_path)
    from_file = Tokenizer.from_file(tmp_path)
    for text in CORPUS:
        assert from_file.encode(text) == ours.encode(text)
    assert from_file.apply_chat_template(CHATS[1]) == ours.apply_chat_template(CHATS[1])
    assert 151645 in from_file.eos_token_ids


@pytest.mark.real_model
def test_stream_decoder_never_splits_characters(ours):
    text = "中文和 emoji 🐍👩‍👩‍👧 混合 ٱلسَّلَامُ ข้อความ"
    ids = ours.encode(text)
    decoder = ours.stream_decoder()
    pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == ours.decode(ids) == text
    assert sum(1 for i in ids if "\ufffd" in ours.decode([i])) > 0  # the text does split characters


def chatml(messages, system="You are a helpful assistant."):
    """Qwen1.5's published ChatML format, built directly from its rule (SPEC section 3)."""
    out = "" if messages[0]["role"] == "system" else f"<|im_start|>system\n{system}<|im_end|>\n"
    for m in messages:
        out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return out + "<|im_start|>assistant\n"


@pytest.mark.parametrize("messages", CHATS)
def test_chatml_fallback_follows_qwen15_format(messages, tiny_tokenizer):
    assert not tiny_tokenizer.has_own_chat_template
    assert tiny_tokenizer.chat_template == CHATML_TEMPLATE
    assert tiny_tokenizer.apply_chat_template(messages) == chatml(messages)
    assert tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=False) == chatml(messages)[
        : -len("<|im_start|>assistant\n")]


@pytest.fixture
def tiny_tokenizer():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab", "<|im_end|>"],
            "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.token_type": [1, 1, 1, 3]}
    return Tokenizer.from_gguf_metadata(meta)


def test_tiny_gguf_vocab_merges(tiny_tokenizer):
    assert tiny_tokenizer.encode("abab") == [2, 2]
    assert tiny_tokenizer.encode("ab<|im_end|>") == [2, 3]
    assert tiny_tokenizer.eos_token_ids == [3]


def test_errors():
    with pytest.raises(TokenizerError, match="unsupported GGUF tokenizer model 'llama'"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "llama"})
    with pytest.raises(TokenizerError, match="no tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(TokenizerError, match="tokenizer.json not found"):
        Tokenizer.from_file("/nonexistent/dir")


def test_bad_messages_are_named(tiny_tokenizer):
    with pytest.raises(TokenizerError, match="non-empty list"):
        tiny_tokenizer.apply_chat_template("hello")
    with pytest.raises(TokenizerError, match=r"messages\[1\] has no string 'role'"):
        tiny_tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"content": "b"}])
    with pytest.raises(TokenizerError, match=r"messages\[0\].content must be a string"):
        tiny_tokenizer.apply_chat_template([{"role": "user", "content": 5}])


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path)
