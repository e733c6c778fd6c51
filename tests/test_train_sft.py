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
    """Stop a run with Ctrl-C at step 3 (it saves a checkpoint), resume it: every step's loss equals an
    uninterrupted run's; a --save-every checkpoint resumes the same way."""
    from qwen15.train import sft

    kw = dict(full=True, max_steps=6, batch_tokens=200, lr=1e-3, seed=3, threads=2, warmup=2)
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
