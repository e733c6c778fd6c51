"""`qwen15 serve --lora NAME=DIR`: each adapter under its own model name beside the base, through the official
openai client; greedy answers equal transformers (+ PEFT for the adapters), also when batched together."""

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from qwen15.cli import main
from qwen15.tokenizer import Tokenizer
from qwen15.weights.gguf import open_gguf, read_metadata

# Longer than a KV block (16 tokens): base and adapter rows must not share cached prefix blocks.
PROMPT = "the answer is in the other one and the other then in the answer, and the one in there " * 2
NEW = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from lora_fixtures import hf_from_gguf, make_peft_adapter, write_small_chat_gguf
    from serve_fixtures import ServerProcess

    d = tmp_path_factory.mktemp("lora-serve")
    base = write_small_chat_gguf(d / "base.gguf")
    tok = Tokenizer.from_gguf_metadata(read_metadata(open_gguf(base)))
    ids = torch.tensor([tok.encode(PROMPT)])
    assert ids.shape[1] > 32

    def greedy(model):
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, eos_token_id=tok.eos_token_ids)
        return [t for t in out[0, ids.shape[1]:].tolist() if t not in tok.eos_token_ids]

    expected = {"tiny": greedy(hf_from_gguf(base))}
    for name, targets, seed in (("alpha", ["q_proj", "v_proj", "down_proj"], 1), ("beta", ["k_proj", "o_proj", "up_proj"], 2)):
        expected[name] = greedy(make_peft_adapter(hf_from_gguf(base), d / name, targets=targets, seed=seed, std=0.5))
    assert len({tuple(v) for v in expected.values()}) == 3  # the three models answer differently
    server = ServerProcess(base, "--lora", f"alpha={d / 'alpha'}", "--lora", f"beta={d / 'beta'}", name="tiny")
    yield server, expected, tok
    server.stop()


def test_models_lists_base_and_adapters(setup):
    server, _, _ = setup
    models = {m.id: m for m in server.client().models.list().data}
    assert set(models) == {"tiny", "alpha", "beta"}
    assert models["alpha"].model_extra["parent"] == "tiny"


def test_each_model_name_answers_with_its_adapter_batched_together(setup):
    server, expected, tok = setup
    client = server.client()

    def ask(name):
        r = client.completions.create(model=name, prompt=PROMPT, max_tokens=NEW, temperature=0)
        assert r.model == name
        return r.choices[0].text

    names = ["tiny", "alpha", "beta", "alpha", "tiny", "beta"]
    with ThreadPoolExecutor(len(names)) as pool:  # together: rows of one step carry different adapters
        texts = list(pool.map(ask, names))
    for name, text in zip(names, texts):
        assert text == tok.decode(expected[name]), name
    # and one after another (the prefix blocks cached by the base must not serve an adapter, nor back)
    for name in ("beta", "tiny", "alpha"):
        assert ask(name) == tok.decode(expected[name])
    chat = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0)
    assert chat.model == "beta"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gamma", prompt="hi", max_tokens=2)
    assert "'tiny', 'alpha', 'beta'" in str(e.value)


def test_bad_lora_flags_are_one_line(tmp_path, capsys):
    for spec, message in (("justadir", "expected NAME=DIR"), (f"x={tmp_path / 'nope'}", "no such directory")):
        assert main(["serve", "--model", str(tmp_path / "unused.gguf"), "--lora", spec]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
