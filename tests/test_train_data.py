"""Training data: the loss mask at exact token positions, packing, and every bad-data case named by file and line."""

import json
from pathlib import Path

import pytest
import torch

from qwen15.train.data import (IGNORE, DataError, collate, encode_record, load_dpo_data, load_sft_data,
                               make_microbatches, make_rows)
from train_fixtures import write_tiny_model


@pytest.fixture(scope="session")
def real_tokenizer(real_gguf_path):
    """The real Qwen2.5 tokenizer and chat template (with tools)."""
    from qwen15.tokenizer import Tokenizer
    from qwen15.weights.gguf import open_gguf, read_metadata

    return Tokenizer.from_gguf_metadata(read_metadata(open_gguf(real_gguf_path)))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tinyhf") / "model")


def expected_mask(ids: list[int], tok) -> list[bool]:
    """Independent of the renderer: a token trains iff it lies after `<|im_start|>assistant\n`, up to and
    including the `<|im_end|>` that closes that turn."""
    header = [tok.token_to_id("<|im_start|>")] + tok.encode("assistant\n")
    end = tok.token_to_id("<|im_end|>")
    out = [False] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i:i + len(header)] == header:
            i += len(header)
            while ids[i] != end:
                out[i] = True
                i += 1
            out[i] = True
        i += 1
    return out


def test_chat_mask_exact_positions_with_im_end(real_tokenizer):
    tok = real_tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    ex = encode_record(tok, {"messages": messages}, "x.jsonl:1")
    # The ids are the template's whole rendering, tokenized as generation sees it.
    assert ex.ids == tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False))
    assert ex.trained == expected_mask(ex.ids, tok)
    im_end = tok.token_to_id("<|im_end|>")
    trained = [t for t, m in zip(ex.ids, ex.trained) if m]
    assert tok.decode(trained) == "Hello! How can I help?<|im_end|>4<|im_end|>"
    # Both assistant turns' <|im_end|> train; the system and user turns' do not.
    ends = [i for i, t in enumerate(ex.ids) if t == im_end]
    assert [ex.trained[i] for i in ends] == [False, False, True, False, True]
    # The last assistant token (<|im_end|>) is at the position right before the trailing newline.
    assert ex.trained[-2] and not ex.trained[-1] and ex.ids[-2] == im_end


def test_tool_calls_train_the_call_not_the_response(real_tokenizer):
    tok = real_tokenizer
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."}]
    ex = encode_record(tok, {"messages": messages, "tools": tools}, "x.jsonl:1")
    assert ex.ids == tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False, tools=tools))
    assert tok.decode([t for t, m in zip(ex.ids, ex.trained) if m]) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
        "It is sunny.<|im_end|>")


def test_prompt_completion_and_text(real_tokenizer):
    tok = real_tokenizer
    eos = tok.eos_token_ids[0]
    ex = encode_record(tok, {"prompt": "def add(a, b):", "completion": "\n    return a + b"}, "x:1")
    p = tok.encode("def add(a, b):")
    assert ex.ids == p + tok.encode("\n    return a + b") + [eos]
    assert ex.trained == [False] * len(p) + [True] * (len(ex.ids) - len(p))
    chat = encode_record(tok, {"prompt": [{"role": "user", "content": "Hi"}], "completion": "Hello"}, "x:2")
    assert tok.decode([t for t, m in zip(chat.ids, chat.trained) if m]) == "Hello<|im_end|>"
    text = encode_record(tok, {"text": "plain words"}, "x:3")
    assert text.ids == tok.encode("plain words") + [eos] and all(text.trained)


def write(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


GOOD = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}


@pytest.mark.parametrize("bad, message", [
    ('{"messages": [', "malformed JSON"),
    ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role 'wizard'"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
    ({"question": "x"}, "expected 'messages'"),
    ({"messages": [{"role": "assistant", "content": "y"}]}, "starts with an assistant turn"),
    ({"prompt": "x"}, "needs both 'prompt' and 'completion'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}, "content must be a string"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_records_name_file_and_line(tmp_path, tiny_dir, bad, message):
    from qwen15.tokenizer import Tokenizer

    path = write(tmp_path / "d.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(DataError) as e:
        load_sft_data(path, Tokenizer.from_file(tiny_dir), max_seq_len=512)
    assert f"{path}:3: " in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_too_long_dropped_truncated_or_refused(tmp_path, tiny_dir):
    from qwen15.tokenizer import Tokenizer

    tok = Tokenizer.from_file(tiny_dir)
    long = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x" * 200}]}
    path = write(tmp_path / "d.jsonl", [GOOD, long, GOOD, long])
    logged = []
    kept = load_sft_data(path, tok, max_seq_len=100, too_long="drop", log=logged.append)
    assert len(kept) == 2 and all(len(e) <= 100 for e in kept)
    assert any(f"{path}:2:" in line for line in logged) and any(f"{path}:4:" in line for line in logged)
    assert "2 of 4 examples longer than --max-seq-len 100 were dropped" in logged[-1]
    logged.clear()
    kept = load_sft_data(path, tok, max_seq_len=100, too_long="truncate", log=logged.append)
    assert [len(e) for e in kept] == [len(kept[0]), 100, len(kept[2]), 100] and "2 of 4" in logged[-1]
    with pytest.raises(DataError, match=f"{path}:2: example is .* tokens, longer than --max-seq-len 100"):
        load_sft_data(path, tok, max_seq_len=100, too_long="error")


def test_missing_file_and_dpo_records(tmp_path, tiny_dir):
    from qwen15.tokenizer import Tokenizer

    tok = Tokenizer.from_file(tiny_dir)
    with pytest.raises(DataError, match="no such data file"):
        load_sft_data(tmp_path / "nope.jsonl", tok, 100)
    path = write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError, match=f"{path}:2: .*missing rejected"):
        load_dpo_data(path, tok, 100)


def test_packing_positions_mask_and_equal_loss(tmp_path, tiny_dir):
    """A packed row (per-document causal mask, positions from 0) gives each example the loss it has alone."""
    from qwen15.tokenizer import Tokenizer
    from qwen15.train.forward import CausalLM, load_base

    tok = Tokenizer.from_file(tiny_dir)
    records = [{"messages": [{"role": "user", "content": f"question {i}" * (i + 1)},
                             {"role": "assistant", "content": f"answer {i}" * (3 - i)}]} for i in range(3)]
    path = write(tmp_path / "d.jsonl", records)
    examples = load_sft_data(path, tok, max_seq_len=512)
    rows = make_rows(examples, 512, packing=True, seed=0, epoch=0)
    assert len(rows) == 1 and len(rows[0].docs) == 3
    batch = collate(rows, tok.pad_token_id, packed=True)
    lengths = rows[0].docs
    assert batch["positions"][0].tolist() == [p for n in lengths for p in range(n)]
    m = batch["mask"][0, 0]
    a, b = lengths[0], lengths[0] + lengths[1]
    assert m[a, a - 1].item() is False and m[a + 1, a].item() is True and m[b - 1, 0].item() is False
    # The document boundary is never a target: the last token of one document does not predict the next.
    assert batch["targets"][0, a - 1].item() == IGNORE

    _, net, _ = load_base(str(tiny_dir), "float32", log=lambda s: None)
    root = CausalLM(net).eval()
    with torch.no_grad():
        packed = root(**batch)[0].sum()
        alone = sum(root(**collate([r], tok.pad_token_id, packed=False))[0].sum()
                    for r in make_rows(examples, 512, packing=False, seed=0, epoch=0))
        # Unpacked micro-batches of several padded rows give the same sum too.
        padded = sum(root(**collate(mb, tok.pad_token_id, packed=False))[0].sum()
                     for mb in make_microbatches(make_rows(examples, 512, False, 0, 0), batch_tokens=4096))
    assert torch.allclose(packed, alone, rtol=1e-5) and torch.allclose(padded, alone, rtol=1e-5)
