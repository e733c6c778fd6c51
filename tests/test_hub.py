"""Hub checkpoints: `download_from_hub` against a local folder laid out exactly like the HF hub cache.

This machine cannot reach the hub, so the tests run offline (HF_HUB_OFFLINE=1, set after huggingface_hub
was imported, as a user would) or against a closed local port standing in for an unreachable hub.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from qwen15.errors import PullError
from qwen15.weights.hub import HUB_PATTERNS, download_from_hub, hub_offline

REPO = "Qwen/Qwen1.5-0.5B-Chat"
COMMIT = "4d14e384a4b037942bb3f3016665157c8bcb70ea"


def make_hub_cache(root: Path, repo: str = REPO, commit: str = COMMIT, files: dict[str, bytes] | None = None,
                   ref: str | None = "main") -> Path:
    """models--owner--name/{refs/<ref>, blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>}."""
    if files is None:
        files = {
            "config.json": json.dumps({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 1024}).encode(),
            "generation_config.json": b"{}",
            "tokenizer.json": b"{}",
            "tokenizer_config.json": b"{}",
            "model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ",
        }
    storage = root / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (name.count("/") + 2)) / "blobs" / blob.name)
    if ref:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Online mode, but the hub endpoint is a closed local port: every connection is refused at once."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")


def test_offline_returns_the_cached_snapshot(tmp_path, offline):
    snapshot = make_hub_cache(tmp_path / "hf")
    got = download_from_hub(REPO, cache_dir=tmp_path / "hf")
    assert got == snapshot
    assert json.loads((got / "config.json").read_text())["hidden_size"] == 1024  # follows the blob links
    assert (got / "model.safetensors").is_file()


def test_offline_by_commit_hash_and_by_ref(tmp_path, offline):
    other = "0" * 40
    make_hub_cache(tmp_path / "hf")
    old = make_hub_cache(tmp_path / "hf", commit=other, ref="v1.0")
    assert download_from_hub(REPO, revision=other, cache_dir=tmp_path / "hf") == old
    assert download_from_hub(REPO, revision="v1.0", cache_dir=tmp_path / "hf") == old
    assert download_from_hub(REPO, cache_dir=tmp_path / "hf").name == COMMIT


def test_offline_without_snapshot_says_how_to_go_local(tmp_path, offline):
    with pytest.raises(PullError) as e:
        download_from_hub(REPO, cache_dir=tmp_path / "empty")
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    assert REPO in msg and "could not be reached" in msg and "HF_HUB_OFFLINE" in msg
    assert "local directory" in msg and str(tmp_path / "empty") in msg
    assert e.value.__suppress_context__  # raised `from None`: no chained traceback


def test_offline_unknown_revision(tmp_path, offline):
    make_hub_cache(tmp_path / "hf")
    with pytest.raises(PullError, match=r"revision 'v9'.*could not be reached"):
        download_from_hub(REPO, revision="v9", cache_dir=tmp_path / "hf")


def test_offline_mode_is_read_when_called(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "true")
    assert hub_offline()


def test_local_files_only_argument(tmp_path, unreachable_hub):
    snapshot = make_hub_cache(tmp_path / "hf")
    assert download_from_hub(REPO, cache_dir=tmp_path / "hf", local_files_only=True) == snapshot


def test_unreachable_hub_falls_back_to_the_cache(tmp_path, unreachable_hub):
    snapshot = make_hub_cache(tmp_path / "hf")
    assert download_from_hub(REPO, cache_dir=tmp_path / "hf") == snapshot


def test_unreachable_hub_without_cache(tmp_path, unreachable_hub):
    for kwargs in ({}, {"filename": "model-q4_k_m.gguf"}):
        with pytest.raises(PullError) as e:
            download_from_hub(REPO, cache_dir=tmp_path / "empty", **kwargs)
        msg = str(e.value)
        assert "\n" not in msg and REPO in msg
        assert "could not be reached" in msg and "Connection refused" in msg and "local directory" in msg


def test_gguf_file_by_name(tmp_path, offline):
    repo = "Qwen/Qwen2.5-0.5B-Instruct-GGUF"
    snapshot = make_hub_cache(tmp_path / "hf", repo=repo, files={"qwen2.5-0.5b-instruct-q4_k_m.gguf": b"GGUF"})
    got = download_from_hub(repo, filename="qwen2.5-0.5b-instruct-q4_k_m.gguf", cache_dir=tmp_path / "hf")
    assert got == snapshot / "qwen2.5-0.5b-instruct-q4_k_m.gguf" and got.read_bytes() == b"GGUF"
    with pytest.raises(PullError, match=r"'other.gguf': not in the snapshot .*HF_HUB_OFFLINE=1"):
        download_from_hub(repo, filename="other.gguf", cache_dir=tmp_path / "hf")


def test_snapshot_without_config_points_to_gguf_files(tmp_path, offline):
    repo = "Qwen/Qwen2.5-0.5B-Instruct-GGUF"
    make_hub_cache(tmp_path / "hf", repo=repo, files={"qwen2.5-0.5b-instruct-q4_k_m.gguf": b"GGUF"})
    with pytest.raises(PullError, match=r"no config.json .*GGUF"):
        download_from_hub(repo, cache_dir=tmp_path / "hf")


def test_snapshot_without_safetensors(tmp_path, offline):
    make_hub_cache(tmp_path / "hf", files={"config.json": b"{}", "pytorch_model.bin": b"x"})
    with pytest.raises(PullError, match=r"no \*\.safetensors"):
        download_from_hub(REPO, cache_dir=tmp_path / "hf")


def test_invalid_repo_id(tmp_path, offline):
    with pytest.raises(PullError, match=r"'a/b/c' is not a valid hub repository id"):
        download_from_hub("a/b/c", cache_dir=tmp_path)


def test_patterns_fetch_only_what_running_needs():
    from huggingface_hub.utils import filter_repo_objects

    repo_files = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                  "model.safetensors.index.json", "pytorch_model.bin", "README.md", "figures/x.png",
                  "qwen.gguf", "vocab.json", "merges.txt"]
    assert list(filter_repo_objects(repo_files, allow_patterns=HUB_PATTERNS)) == repo_files[:7]
