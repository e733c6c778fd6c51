"""The repack cache keyed by content, pruned and capped, and `qwen15 cache` (issue 16)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q

from gguf_fixtures import random_state_dict, tiny_config, write_tiny_gguf

_TOKENIZER = {"tokenizer.ggml.model": "gpt2",
              "tokenizer.ggml.tokens": [chr(ord("a") + i) for i in range(26)] + ["ab"],
              "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.token_type": [1] * 27}


def _cli(*args, env):
    import qwen15

    src = str(Path(qwen15.__file__).resolve().parents[1])
    return subprocess.run([sys.executable, "-m", "qwen15.cli", "cache", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env, "PYTHONPATH": src})


def _gguf(path: Path, seed: int) -> Path:
    config = tiny_config(hidden_size=128, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    write_tiny_gguf(path, config, random_state_dict(config, seed=seed), Q.Q8_0, metadata=_TOKENIZER)
    return path


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """An empty cache folder, sharing the compiled C kernels of the real one (not rebuilt with gcc per test)."""
    from qwen15.weights.packaged import cache_dir

    real = cache_dir() / "kernels"
    real.mkdir(parents=True, exist_ok=True)
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "kernels").symlink_to(real)
    monkeypatch.setenv("QWEN15_CACHE", str(folder))
    return folder


def _load(path: Path) -> None:
    import torch

    from qwen15.engine.engine import load_checkpoint

    load_checkpoint(path, torch.float32, "cpu", quant="gguf-int8")


def test_one_entry_per_content_stale_entries_pruned_and_the_cache_capped(tmp_path, monkeypatch, cache):
    from qwen15.quant import repack_cache

    env = {"QWEN15_CACHE": str(cache)}
    a = _gguf(tmp_path / "a.gguf", seed=1)
    b = tmp_path / "copy" / "b.gguf"
    b.parent.mkdir()
    shutil.copy(a, b)  # the same file at a second path (its own mtime): it shares the entry
    _load(a)
    _load(b)
    (entry,) = repack_cache.entries()
    assert set(entry.sources) == {str(a.resolve()), str(b.resolve())}
    listing = _cli("ls", env=env)
    assert listing.returncode == 0, listing.stderr
    assert entry.path.name in listing.stdout and str(a.resolve()) in listing.stdout and str(b.resolve()) in listing.stdout

    # a different model (other weights, same shapes) gets an entry of its own
    c = _gguf(tmp_path / "c.gguf", seed=2)
    _load(c)
    assert len(repack_cache.entries()) == 2

    # a source gone: still current through the other; both gone, or one rewritten in place: stale
    a.unlink()
    assert entry.stale_reason() is None
    os.utime(b, ns=(b.stat().st_atime_ns, b.stat().st_mtime_ns + 10**9))  # b "changed in place"
    pruned = _cli("prune", env=env)
    assert pruned.returncode == 0, pruned.stderr
    assert entry.path.name in pruned.stdout and "changed" in pruned.stdout
    assert [e.path.name for e in repack_cache.entries()] != [entry.path.name] and not entry.path.exists()

    # the cap: a new entry pushes out the least recently used one
    (kept,) = repack_cache.entries()
    monkeypatch.setenv("QWEN15_REPACK_CACHE_MAX", str(int(kept.size * 1.5)))
    d = _gguf(tmp_path / "d.gguf", seed=3)
    _load(d)
    (left,) = repack_cache.entries()
    assert str(d.resolve()) in left.sources and not kept.path.exists()

    # rm by source path, then --all
    removed = _cli("rm", str(d), env=env)
    assert removed.returncode == 0 and left.path.name in removed.stdout and not repack_cache.entries()
    _load(c)
    assert _cli("rm", "--all", env=env).returncode == 0 and not repack_cache.entries()
    missing = _cli("rm", "nothing-like-it", env=env)
    assert missing.returncode == 2 and missing.stderr.startswith("qwen15: error: ") and "nothing-like-it" in missing.stderr


def test_a_file_rewritten_in_place_is_not_served_from_its_old_entry(tmp_path, monkeypatch, cache):
    import torch

    from qwen15.engine.engine import load_checkpoint
    from qwen15.quant import repack_cache

    path = _gguf(tmp_path / "m.gguf", seed=1)
    _load(path)
    _gguf(path, seed=4)  # new weights at the same path
    _, model, _ = load_checkpoint(path, torch.float32, "cpu", quant="gguf-int8")
    fresh = tmp_path / "fresh.gguf"
    shutil.copy(path, fresh)
    monkeypatch.setenv("QWEN15_REPACK_CACHE", "0")
    _, reference, _ = load_checkpoint(fresh, torch.float32, "cpu", quant="gguf-int8")
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        assert torch.equal(model(ids), reference(ids))
    assert len(repack_cache.entries()) == 1  # the old entry went


@pytest.mark.parametrize("value", ["lots", "12Q"])
def test_a_bad_cache_cap_is_one_line(tmp_path, value):
    out = _cli("prune", env={"QWEN15_CACHE": str(tmp_path), "QWEN15_REPACK_CACHE_MAX": value})
    assert out.returncode == 2 and "QWEN15_REPACK_CACHE_MAX" in out.stderr and len(out.stderr.strip().splitlines()) == 1
