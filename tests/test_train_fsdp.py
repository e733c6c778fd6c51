"""FSDP2 on 2 gloo processes equals one process with the same global batch (every step's loss and the final
weights within 1e-5: gradients averaged, not summed, pytorch#162338), and its checkpoint resumes on 1 process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from train_fixtures import write_chat_data, write_tiny_model


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fsdp2_two_processes_equal_one(tmp_path):
    import qwen15
    from qwen15.train import sft

    model = write_tiny_model(tmp_path / "model", tied=False)  # untied: the root holds lm_head too
    data = write_chat_data(tmp_path / "chat.jsonl", 16)
    common = ["--model", str(model), "--data", str(data), "--full", "--max-steps", "3", "--batch-tokens", "200",
              "--lr", "1e-3", "--warmup", "0", "--threads", "1", "--seed", "5"]
    src = str(Path(qwen15.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "qwen15", "train", "sft", *common, "--out", str(two),
                           "--grad-accum", "1", "--save-every", "2", "--nproc", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stderr

    # One process, two micro-batches a step: the same global batch as 2 processes x 1.
    one = sft(str(model), data, tmp_path / "one", full=True, max_steps=3, batch_tokens=200, lr=1e-3, warmup=0,
              threads=1, seed=5, grad_accum=2)
    assert losses(two) == pytest.approx(one.losses, rel=1e-5, abs=0)
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert sorted(a) == sorted(b) and "lm_head.weight" in a
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5

    # The 2-process checkpoint (full optimizer state, not shards) resumes on one process.
    resumed = sft(str(model), data, tmp_path / "resumed", full=True, max_steps=3, batch_tokens=200, lr=1e-3,
                  warmup=0, threads=1, seed=5, grad_accum=2, resume=str(two / "checkpoint-2"))
    assert resumed.losses == pytest.approx(one.losses[2:], rel=1e-5, abs=0)
