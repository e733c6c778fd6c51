"""`qwen15 train merge`: adapter folded into the base, written as an HF directory (transformers loads it) or
a GGUF (the gguf package reads back exactly the quantized merged weights; qwen15 loads it)."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from qwen15.cli import main
from qwen15.tokenizer import Tokenizer
from qwen15.train.merge import merge
from qwen15.weights.gguf import load_gguf, read_metadata
from qwen15.weights.names import gguf_names

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Merge 2 adapters, ünïcode 字"}]


@pytest.fixture(scope="module")
def base_gguf(tmp_path_factory):
    from lora_fixtures import write_small_chat_gguf

    return write_small_chat_gguf(tmp_path_factory.mktemp("base") / "small-chat.gguf")


@pytest.fixture(scope="module")
def base_and_adapter(base_gguf, tmp_path_factory):
    """The base as transformers' Qwen2 (float32), a PEFT adapter on it with random A and B, and PEFT's
    logits and merged weights: the reference for every output."""
    from lora_fixtures import hf_from_gguf, make_peft_adapter

    config, state, meta = load_gguf(base_gguf)
    tok = Tokenizer.from_gguf_metadata(meta)
    ids = torch.tensor([tok.encode(tok.apply_chat_template(CHAT))])
    hf = hf_from_gguf(base_gguf)
    with torch.no_grad():
        base_logits = hf(ids).logits
    adapter = tmp_path_factory.mktemp("adapter") / "peft"
    pm = make_peft_adapter(hf, adapter)
    with torch.no_grad():
        logits = pm(ids).logits
        assert (logits - base_logits).abs().max() > 0.1  # the adapter matters
    merged_model = pm.merge_and_unload()
    merged = {k: v.detach().clone() for k, v in merged_model.state_dict().items()}
    with torch.no_grad():  # merged and unmerged differ by float reassociation only
        merged_logits = merged_model(ids).logits
        torch.testing.assert_close(merged_logits, logits, atol=1e-2, rtol=1e-3)
    return dict(config=config, meta=meta, adapter=adapter, ids=ids, logits=logits, merged=merged,
                merged_logits=merged_logits)


def test_merge_to_hf_directory_loads_in_transformers(base_and_adapter, base_gguf, tmp_path):
    ref = base_and_adapter
    out = merge(base_gguf, ref["adapter"], tmp_path / "merged", type="f32")
    model = AutoModelForCausalLM.from_pretrained(out).float().eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ref["ids"]).logits, ref["merged_logits"], atol=1e-4, rtol=1e-4)
    # the tokenizer made from the GGUF's vocabulary renders and encodes as the GGUF's own does
    hf_tok = AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.from_gguf_metadata(ref["meta"])
    text = hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == ours.apply_chat_template(CHAT)
    assert hf_tok(text)["input_ids"] == ours.encode(text)


@pytest.mark.parametrize("base,qtype", [("gguf", "q8_0"), ("hf", "bf16"), ("hf", "f16")])
def test_merge_to_gguf(base_and_adapter, base_gguf, tmp_path, base, qtype):
    ref = base_and_adapter
    model = base_gguf
    if base == "hf":  # an HF base (tokenizer.json, not GGUF metadata): the base itself, merged with B = 0
        model = merge(base_gguf, zero_adapter(ref["adapter"], tmp_path), tmp_path / "hf-base", type="f32")
    out = tmp_path / "merged.gguf"
    assert main(["train", "merge", "--model", str(model), "--adapter", str(ref["adapter"]), "--out", str(out),
                 "--type", qtype]) == 0
    reader = gguf.GGUFReader(out)
    meta = read_metadata(reader)
    assert meta["general.architecture"] == "qwen2"
    assert meta["tokenizer.ggml.tokens"] == ref["meta"]["tokenizer.ggml.tokens"]
    assert meta["tokenizer.chat_template"] == ref["meta"]["tokenizer.chat_template"]
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.encode(tok.apply_chat_template(CHAT)) == ref["ids"][0].tolist()
    # every tensor is exactly PEFT's merged weight stored as the type (gguf's own quantizer/dequantizer)
    want = {"q8_0": Q.Q8_0, "bf16": Q.BF16, "f16": Q.F16}[qtype]
    tensors = {t.name: t for t in reader.tensors}
    for ours, gname in gguf_names(ref["config"]).items():
        t, expected = tensors[gname], ref["merged"][ours].numpy()
        if expected.ndim == 1:
            assert t.tensor_type == Q.F32
        else:
            assert t.tensor_type == want
            expected = gguf.quants.dequantize(gguf.quants.quantize(expected, want), want)
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected.shape)
        np.testing.assert_array_equal(got, expected, err_msg=gname)
    # qwen15 runs it as transformers runs the same (quantized) values; llama.cpp's loader reads this layout
    from lora_fixtures import hf_from_gguf

    from qwen15.engine.engine import LLM

    llm = LLM.load(out, quant="gguf-f32")
    with torch.no_grad():
        expected = hf_from_gguf(out)(ref["ids"]).logits
        torch.testing.assert_close(llm.model(ref["ids"]), expected, atol=1e-3, rtol=1e-4)


def zero_adapter(adapter, tmp_path):
    """A copy of the adapter with B = 0: merging it gives the base itself."""
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "zero"
    shutil.copytree(adapter, d)
    t = load_file(str(d / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in t.items()}, str(d / "adapter_model.safetensors"))
    return d


def test_merge_errors_are_one_line(base_and_adapter, base_gguf, tmp_path, capsys):
    cases = [
        (["--adapter", str(base_and_adapter["adapter"]), "--out", str(tmp_path / "d"), "--type", "q8_0"],
         "--type q8_0 needs a .gguf output"),
        (["--adapter", str(tmp_path / "missing"), "--out", str(tmp_path / "x.gguf")], "no such directory"),
    ]
    for args, message in cases:
        assert main(["train", "merge", "--model", str(base_gguf), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
