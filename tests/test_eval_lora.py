"""`qwen15 eval run --lora DIR`: the engine backend scores with the adapter applied, as transformers + PEFT do."""

import argparse
import json

import pytest
import torch

from qwen15.cli import main
from qwen15.eval.cli import make_backend
from qwen15.tokenizer import Tokenizer
from qwen15.weights.gguf import open_gguf, read_metadata


def _args(base, lora):
    return argparse.Namespace(endpoint=None, model=str(base), threads=1, context=None, device="cpu", quant="none",
                              lora=lora)


def test_eval_backend_with_lora_scores_as_peft(tmp_path):
    from lora_fixtures import hf_from_gguf, make_peft_adapter, write_small_chat_gguf

    base = write_small_chat_gguf(tmp_path / "base.gguf")
    hf = hf_from_gguf(base)
    pm = make_peft_adapter(hf, tmp_path / "adapter", std=0.5)
    tok = Tokenizer.from_gguf_metadata(read_metadata(open_gguf(base)))
    context, continuation = "the answer", " in short"
    ctx, full = tok.encode(context), tok.encode(context + continuation)
    with torch.no_grad():
        logp = torch.log_softmax(pm(input_ids=torch.tensor([full])).logits[0].double(), -1)
    expected = float(sum(logp[i - 1, full[i]] for i in range(len(ctx), len(full))))

    backend, _ = make_backend(_args(base, str(tmp_path / "adapter")))
    got = backend.loglikelihood([(context, continuation)])[0]
    plain = make_backend(_args(base, None))[0].loglikelihood([(context, continuation)])[0]
    assert abs(got - expected) < 1e-4 * max(1.0, abs(expected))
    assert abs(plain - expected) > 1e-2  # the adapter changes the score


def test_eval_run_with_a_missing_adapter_is_one_line(tmp_path, capsys):
    from lora_fixtures import write_small_chat_gguf

    base = write_small_chat_gguf(tmp_path / "base.gguf")
    code = main(["eval", "run", "--task", "gsm8k", "--limit", "1", "--model", str(base),
                 "--lora", str(tmp_path / "nowhere"), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "nowhere" in err and err.count("\n") == 1
