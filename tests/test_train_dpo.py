"""`qwen15 train dpo`: step 0 is ln 2; the loss and rewards equal an independent computation from
transformers' log-probs of the base (reference) and the trained (policy) weights."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from train_fixtures import hf_model, write_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tinyhf") / "model")


def write_pairs(path, n=8):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"{i} + {i} =", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1}!"}) + "\n")
    return path


def hf_dpo(policy_dir, ref_dir, pairs_path, beta, eps):
    """TRL's sigmoid loss and rewards from transformers' log-probs (prompt + completion + eos, completion summed)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ref_dir))
    models = {"policy": hf_model(policy_dir), "ref": hf_model(ref_dir)}

    def logp(model, prompt, completion):
        p = tok.encode(prompt, add_special_tokens=False)
        ids = p + tok.encode(completion, add_special_tokens=False) + [tok.eos_token_id]
        with torch.no_grad():
            lp = F.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
        return float(lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][len(p) - 1:].sum())

    losses, margins, acc = [], [], []
    for line in open(pairs_path):
        r = json.loads(line)
        lp = {(m, s): logp(models[m], r["prompt"], r[s]) for m in models for s in ("chosen", "rejected")}
        chosen = beta * (lp["policy", "chosen"] - lp["ref", "chosen"])
        rejected = beta * (lp["policy", "rejected"] - lp["ref", "rejected"])
        m = torch.tensor(chosen - rejected)
        losses.append(float(-(1 - eps) * F.logsigmoid(m) - eps * F.logsigmoid(-m)))
        margins.append(chosen - rejected)
        acc.append(float(chosen > rejected))
    n = len(losses)
    return sum(losses) / n, sum(margins) / n, sum(acc) / n


def test_full_dpo_step0_ln2_and_loss_matches_transformers(tmp_path, tiny_dir):
    from qwen15.train import dpo

    pairs = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "dpo"
    # One step over all pairs; the eval after it scores the same pairs with the trained policy.
    result = dpo(str(tiny_dir), pairs, out, full=True, max_steps=1, grad_accum=8, batch_tokens=64, lr=3e-3,
                 beta=0.2, label_smoothing=0.1, eval_data=str(pairs), eval_every=1, warmup=0, threads=2)
    step = result.metrics[0]
    assert step["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # Policy = reference (up to float32 summation order: the reference ran in other batch shapes).
    assert max(abs(step[k]) for k in ("rewards/chosen", "rewards/rejected", "rewards/margin")) < 1e-6
    for key in ("logps/chosen", "logps/rejected", "rewards/accuracy"):
        assert key in step and f"eval_{key}" in step
    loss, margin, accuracy = hf_dpo(out, tiny_dir, pairs, beta=0.2, eps=0.1)
    assert step["eval_loss"] == pytest.approx(loss, rel=1e-5) and step["eval_loss"] < math.log(2)
    assert step["eval_rewards/margin"] == pytest.approx(margin, rel=1e-4, abs=1e-6)
    assert step["eval_rewards/accuracy"] == accuracy


def test_lora_dpo_reference_is_the_base_without_the_adapter(tmp_path, tiny_dir):
    """With LoRA the reference is the same model with the adapter off: step 0 is ln 2 exactly (run by the CLI)."""
    from qwen15.cli import main

    pairs = write_pairs(tmp_path / "pairs.jsonl", 4)
    out = tmp_path / "lora"
    assert main(["train", "dpo", "--model", str(tiny_dir), "--data", str(pairs), "--out", str(out), "--max-steps", "2",
                 "--batch-tokens", "64", "--grad-accum", "2", "--lr", "1e-2", "--warmup", "0", "--threads", "2"]) == 0
    first, second = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7) and first["rewards/margin"] == 0.0
    assert second["rewards/margin"] != 0.0  # the adapter moved the policy away from the reference
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
