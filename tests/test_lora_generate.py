"""`qwen15 generate --lora DIR`: greedy tokens with an unmerged adapter equal transformers + PEFT's."""

import json

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from qwen15.cli import main
from qwen15.tokenizer import Tokenizer
from qwen15.weights.gguf import open_gguf, read_metadata

PROMPT = "the answer in short"
NEW = 12


@pytest.mark.parametrize("qtype,quant", [(Q.F32, "none"), (Q.Q8_0, "gguf-f32")], ids=["f32", "q8_0-compact"])
def test_generate_with_lora_matches_peft(tmp_path, capsys, qtype, quant):
    from lora_fixtures import hf_from_gguf, make_peft_adapter, write_small_chat_gguf

    base = write_small_chat_gguf(tmp_path / "base.gguf", qtype)
    hf = hf_from_gguf(base)
    tok = Tokenizer.from_gguf_metadata(read_metadata(open_gguf(base)))
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        plain = hf.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=tok.eos_token_ids)[0, ids.shape[1]:]
    pm = make_peft_adapter(hf, tmp_path / "adapter", targets=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                           std=0.5)
    with torch.no_grad():
        expected = pm.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False,
                               eos_token_id=tok.eos_token_ids)[0, ids.shape[1]:].tolist()
    expected = [t for t in expected if t not in tok.eos_token_ids]
    assert expected != plain.tolist()[:len(expected)]  # the adapter changes the greedy continuation

    assert main(["generate", "--model", str(base), "--lora", str(tmp_path / "adapter"), "--prompt", PROMPT,
                 "--max-tokens", str(NEW), "--temperature", "0", "--json", "--quant", quant]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["token_ids"] == expected


def test_generate_with_a_bad_adapter_is_one_line(tmp_path, capsys):
    from lora_fixtures import write_small_chat_gguf

    base = write_small_chat_gguf(tmp_path / "base.gguf")
    (tmp_path / "notlora").mkdir()
    (tmp_path / "notlora" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    assert main(["generate", "--model", str(base), "--lora", str(tmp_path / "notlora"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "peft_type is 'IA3', expected 'LORA'" in err and err.count("\n") == 1
