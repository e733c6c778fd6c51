"""`qwen15 train sft`: losses against transformers, the saved model, resume equality, CLI errors."""

import json
import os
import signal

import pytest
import torch

from train_fixtures import hf_model, write_chat_data, write_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tinyhf") / "model")


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("data") / "chat.jsonl", 12)


def hf_chat_loss(model_dir, data_path) -> float:
    """Mean next-token loss over assistant tokens (with <|im_end|>), by transformers' tokenizer and model."""
    from transformers import AutoTokenizer

    from test_train_data import expected_mask

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = hf_model(model_dir)
    total, count = 0.0, 0
    for line in open(data_path):
        text = tok.apply_chat_template(json.loads(line)["messages"], tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)

        class T:  # the helper's tokenizer protocol over transformers' tokenizer
            token_to_id = staticmethod(tok.convert_tokens_to_ids)
            encode = staticmethod(lambda s: tok.encode(s, add_special_tokens=False))
        mask = torch.tensor(expected_mask(ids, T))
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
        total += float(nll[mask[1:]].sum())
        count += int(mask[1:].sum())
    return total / count


def test_full_sft_cli_losses_match_transformers(tmp_path, tiny_dir, chat_data, capsys):
    from qwen15.cli import main

    out = tmp_path / "run"
    # One step covers every example (grad accumulation), so step 1's loss is the data's loss on the base;
    # the eval after it is the data's loss on the trained weights that land in --out.
    rc = main(["train", "sft", "--model", str(tiny_dir), "--data", str(chat_data), "--eval-data", str(chat_data),
               "--out", str(out), "--full", "--max-steps", "2", "--grad-accum", "8", "--batch-tokens", "200",
               "--lr", "1e-3", "--eval-every", "1", "--threads", "2", "--warmup", "0"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(k in rows[0] for k in ("loss", "lr", "tokens_per_s", "eval_loss"))
    assert rows[0]["loss"] == pytest.approx(hf_chat_loss(tiny_dir, chat_data), rel=1e-5)
    assert rows[1]["eval_loss"] == pytest.approx(hf_chat_loss(out, chat_data), rel=1e-5)
    assert rows[1]["eval_loss"] < rows[0]["loss"]
    assert (out / "loss.png").stat().st_size > 0
    err = capsys.readouterr().err
    assert "12 examples" in err and "model (Hugging Face directory)" in err


def test_resume_repeats_the_loss_sequence(tmp_path, tiny_dir, chat_data):
    """Stop a LoRA run (dropout on: the RNG states matter) with Ctrl-C at step 3 (it saves a checkpoint), resume
    it: every step's loss equals an uninterrupted run's; a --save-every checkpoint resumes the same way."""
    from qwen15.train import sft

    kw = dict(max_steps=6, batch_tokens=200, lr=1e-2, seed=3, threads=2, warmup=2, lora_r=4, lora_dropout=0.1)
    whole = sft(str(tiny_dir), chat_data, tmp_path / "whole", **kw).losses

    def interrupt(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does: the loop saves after this step

    first = sft(str(tiny_dir), chat_data, tmp_path / "cut", save_every=2, on_step=interrupt, **kw)
    assert first.stopped and first.steps == 3 and first.checkpoint.name == "checkpoint-3"
    assert sorted(p.name for p in (tmp_path / "cut").iterdir() if p.name.startswith(("checkpoint", ".check"))) == [
        "checkpoint-2", "checkpoint-3"]
    rest = sft(str(tiny_dir), chat_data, tmp_path / "cut", resume=str(tmp_path / "cut"), **kw)
    assert first.losses + rest.losses == whole
    again = sft(str(tiny_dir), chat_data, tmp_path / "cut2", resume=str(tmp_path / "cut" / "checkpoint-2"), **kw)
    assert again.losses == whole[2:]
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in lines] == whole


@pytest.mark.parametrize("args, message", [
    (["--data", "{missing}"], "no such data file"),
    (["--data", "{data}", "--target", "q,x"], "--target 'q,x': unknown x"),
    (["--data", "{data}", "--resume", "{tmp}"], "no checkpoint there"),
    (["--data", "{data}", "--lr", "-1"], "--lr must be > 0"),
])
def test_cli_errors_are_one_line(tmp_path, tiny_dir, chat_data, capsys, args, message):
    from qwen15.cli import main

    args = [a.format(missing=tmp_path / "nope.jsonl", data=chat_data, tmp=tmp_path) for a in args]
    rc = main(["train", "sft", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--full", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("qwen15: error: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_trained_adapter_loads_in_peft_with_equal_logits(tmp_path, tiny_dir, chat_data):
    """The adapter a LoRA run writes is PEFT's format: PeftModel on transformers' Qwen2 gives the logits
    qwen15 gives with the same adapter (1e-4, fp32)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from qwen15.lora import load_adapter
    from qwen15.train import sft
    from qwen15.train.forward import load_base

    out = tmp_path / "lora"
    sft(str(tiny_dir), chat_data, out, max_steps=3, batch_tokens=400, lr=2e-2, warmup=0, lora_r=4, lora_alpha=8,
        target="q,k,v,o,gate,up,down", threads=2)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in saved
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in saved and len(saved) == 2 * 7 * 2
    assert all(float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k)  # trained, not the zero init

    _, net, _ = load_base(str(tiny_dir), "float32", log=lambda s: None)
    load_adapter(net, out)
    ids = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(1))
    peft_model = PeftModel.from_pretrained(hf_model(tiny_dir), str(out)).eval()
    with torch.no_grad():
        ours, theirs = net.eval()(ids), peft_model(input_ids=ids).logits
        base = hf_model(tiny_dir)(input_ids=ids).logits
    assert (theirs - base).abs().max() > 1e-3  # the adapter changes the logits ...
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)  # ... the same way in both
