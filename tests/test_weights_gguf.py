"""GGUF loading: tiny files written with gguf.GGUFWriter, and the real Qwen2.5-Coder-0.5B Q4_K_M file.

References are independent of the loader: the values the fixture wrote (dequantized with
gguf.quants.dequantize), the original float tensors, gguf.GGUFReader's view of the same file, and
the model card's numbers."""

import dataclasses

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from gguf_fixtures import K_QUANTS, random_state_dict, tiny_config, write_tiny_gguf
from qwen15.errors import WeightsError
from qwen15.weights.gguf import config_from_gguf, load_gguf, open_gguf, read_metadata
from qwen15.weights.names import check_state_dict, expected_shapes, gguf_names

ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# Worst-case error of the numpy quantizers on N(0, 0.5) values, relative to the largest |x| of a block.
QUANT_TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 0.01, Q.Q5_0: 0.07, Q.Q5_1: 0.05,
                   Q.Q4_0: 0.14, Q.Q4_1: 0.1}


def config_for(qtype, **kw):
    # K-quant blocks are 256 wide: rows must be a multiple of 256 for every matrix to use the type.
    if qtype in K_QUANTS:
        kw = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                  shared_expert_intermediate_size=256, **kw) if kw.get("model_type") == "qwen2_moe" \
            else dict(hidden_size=256, intermediate_size=512, **kw)
    return tiny_config(**kw)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_load_matches_what_was_written(tmp_path, qtype):
    config = config_for(qtype)
    sd = random_state_dict(config)
    stored = write_tiny_gguf(tmp_path / "m.gguf", config, sd, qtype)
    loaded_config, state, meta = load_gguf(tmp_path / "m.gguf")
    assert loaded_config == config
    assert meta["general.architecture"] == "qwen2"
    assert set(state) == set(expected_shapes(config)) == set(stored)
    for name, want in expected_shapes(config).items():
        assert tuple(state[name].shape) == want, name
        assert state[name].dtype == torch.float32
        torch.testing.assert_close(state[name], stored[name], rtol=0, atol=0, msg=name)
    # The values are the original floats up to quantization error: catches transposed square matrices.
    if qtype in QUANT_TOLERANCE:
        for name, t in state.items():
            err = (t - sd[name]).abs().max().item()
            assert err <= QUANT_TOLERANCE[qtype] * sd[name].abs().max().item() + 1e-7, (name, err)
    # The file really holds the requested type (and the F32 fallback only for 1-D tensors).
    types = {t.name: t.tensor_type for t in open_gguf(tmp_path / "m.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == qtype and types["blk.0.ffn_down.weight"] == qtype
    assert types["blk.0.attn_q.bias"] == Q.F32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0], ids=lambda q: q.name)
def test_load_casts_to_dtype(tmp_path, qtype, dtype):
    config = tiny_config()
    stored = write_tiny_gguf(tmp_path / "m.gguf", config, random_state_dict(config), qtype)
    _, state, _ = load_gguf(tmp_path / "m.gguf", dtype=dtype)
    for name, t in state.items():
        assert t.dtype == dtype
        assert torch.equal(t, stored[name].to(dtype)), name


CONFIGS = {
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "gqa_untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "mqa_rope1e6_eps1e-5": dict(num_key_value_heads=1, rope_theta=1e6, rms_norm_eps=1e-5,
                                max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151645),
    "head_dim_override": dict(num_key_value_heads=2, head_dim=32),
    "moe": dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                shared_expert_intermediate_size=48, intermediate_size=48),
    "moe_tied_gqa": dict(model_type="qwen2_moe", num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                         shared_expert_intermediate_size=64, intermediate_size=64, tie_word_embeddings=True,
                         num_key_value_heads=1),
}


@pytest.mark.parametrize("case", CONFIGS)
def test_config_round_trips(tmp_path, case):
    config = tiny_config(**CONFIGS[case])
    sd = random_state_dict(config)
    stored = write_tiny_gguf(tmp_path / "m.gguf", config, sd, Q.Q8_0)
    loaded, state, meta = load_gguf(tmp_path / "m.gguf")
    assert dataclasses.asdict(loaded) == dataclasses.asdict(config)
    assert ("lm_head.weight" in state) == (not config.tie_word_embeddings)
    assert ("output.weight" in {t.name for t in open_gguf(tmp_path / "m.gguf").tensors}) == (
        not config.tie_word_embeddings)
    assert state["model.embed_tokens.weight"].shape == (config.vocab_size, config.hidden_size)
    for name in stored:
        assert torch.equal(state[name], stored[name]), name
    check_state_dict(state, config, "x")


def test_moe_keys_are_gguf_constants(tmp_path):
    """The metadata keys read are the ones gguf (llama.cpp) defines for qwen2moe."""
    config = tiny_config(moe=True)
    write_tiny_gguf(tmp_path / "m.gguf", config, random_state_dict(config))
    meta = read_metadata(open_gguf(tmp_path / "m.gguf"))
    K = gguf.Keys.LLM
    assert meta[K.EXPERT_COUNT.format(arch="qwen2moe")] == 4
    assert meta[K.EXPERT_USED_COUNT.format(arch="qwen2moe")] == 2
    assert meta[K.EXPERT_FEED_FORWARD_LENGTH.format(arch="qwen2moe")] == 32
    assert meta[K.EXPERT_SHARED_FEED_FORWARD_LENGTH.format(arch="qwen2moe")] == 64
    assert meta[gguf.Keys.Attention.HEAD_COUNT_KV.format(arch="qwen2moe")] == 2


def test_moe_stacked_experts_and_shared_expert(tmp_path):
    config = tiny_config(moe=True)
    sd = random_state_dict(config)
    write_tiny_gguf(tmp_path / "m.gguf", config, sd, Q.F32)
    _, state, _ = load_gguf(tmp_path / "m.gguf")
    E, Im, H, Is = 4, 32, 64, 64
    p = "model.layers.1.mlp."
    assert state[p + "experts.gate_proj"].shape == (E, Im, H)
    assert state[p + "experts.up_proj"].shape == (E, Im, H)
    assert state[p + "experts.down_proj"].shape == (E, H, Im)
    assert state[p + "gate.weight"].shape == (E, H)
    assert state[p + "shared_expert.down_proj.weight"].shape == (H, Is)
    assert state[p + "shared_expert_gate.weight"].shape == (1, H)
    # Expert j of the stacked GGUF tensor is expert j of ours (F32: exact).
    for j in range(E):
        assert torch.equal(state[p + "experts.down_proj"][j], sd[p + "experts.down_proj"][j])
    for name in sd:
        assert torch.equal(state[name], sd[name]), name


def test_shared_expert_gate_written_one_dimensional(tmp_path):
    """llama.cpp declares ffn_gate_inp_shexp as {n_embd}; a 1-D tensor loads as our [1, H]."""
    config = tiny_config(moe=True)
    sd = random_state_dict(config)
    for i in range(config.num_hidden_layers):
        sd[f"model.layers.{i}.mlp.shared_expert_gate.weight"] = sd[f"model.layers.{i}.mlp.shared_expert_gate.weight"][0]
    write_tiny_gguf(tmp_path / "m.gguf", config, sd)
    assert open_gguf(tmp_path / "m.gguf").tensor_map["blk.0.ffn_gate_inp_shexp.weight"].shape == (64,)
    _, state, _ = load_gguf(tmp_path / "m.gguf")
    assert torch.equal(state["model.layers.0.mlp.shared_expert_gate.weight"], sd["model.layers.0.mlp.shared_expert_gate.weight"][None])


def test_moe_dense_layers_become_mlp_only_layers(tmp_path):
    config = tiny_config(moe=True, num_hidden_layers=3, mlp_only_layers=[1])
    sd = random_state_dict(config)
    write_tiny_gguf(tmp_path / "m.gguf", config, sd)
    loaded, state, _ = load_gguf(tmp_path / "m.gguf")
    assert loaded.mlp_only_layers == [1] and not loaded.is_moe_layer(1) and loaded.is_moe_layer(2)
    assert torch.equal(state["model.layers.1.mlp.gate_proj.weight"], sd["model.layers.1.mlp.gate_proj.weight"])


def test_parser_agrees_with_gguf_reader(tmp_path):
    config = tiny_config(moe=True)
    meta_in = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "Ġb", "<|im_end|>", "中文"],
               "tokenizer.ggml.token_type": [1, 1, 3, 1], "tokenizer.ggml.add_bos_token": False,
               "test.negative": -7, "test.float": 0.1, "tokenizer.chat_template": "{{ x }}\n"}
    write_tiny_gguf(tmp_path / "m.gguf", config, random_state_dict(config), Q.Q8_0, metadata=meta_in)
    ours = open_gguf(tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    meta = read_metadata(ours)
    assert meta == read_metadata(reader)
    for key, value in meta_in.items():
        assert meta[key] == (pytest.approx(value) if isinstance(value, float) else value)
    assert [t.name for t in ours.tensors] == [t.name for t in reader.tensors]
    for mine, theirs in zip(ours.tensors, reader.tensors):
        assert mine.tensor_type == theirs.tensor_type
        assert mine.shape == tuple(theirs.shape.tolist())
        assert mine.data_offset == theirs.data_offset and mine.n_bytes == theirs.n_bytes
        assert mine.data.shape == theirs.data.shape and np.array_equal(mine.data, theirs.data)


def test_progress_bar_only_when_asked(tmp_path, capsys):
    config = tiny_config()
    write_tiny_gguf(tmp_path / "m.gguf", config, random_state_dict(config))
    load_gguf(tmp_path / "m.gguf")  # stderr is not a terminal under pytest
    assert capsys.readouterr().err == ""
    load_gguf(tmp_path / "m.gguf", progress=True)
    assert "tensor" in capsys.readouterr().err


# ---- bad input --------------------------------------------------------------------------------------

@pytest.fixture
def tiny_file(tmp_path):
    config = tiny_config()
    write_tiny_gguf(tmp_path / "m.gguf", config, random_state_dict(config), Q.Q8_0)
    return tmp_path / "m.gguf"


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip file, not a gguf" * 10)
    with pytest.raises(WeightsError) as e:
        load_gguf(path)
    assert one_line(e).startswith(f"{path}: not a GGUF file")


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="file not found"):
        load_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize("where", ["data", "header"])
def test_truncated(tmp_path, tiny_file, where):
    f = open_gguf(tiny_file)
    cut = (f.data_start + f.size) // 2 if where == "data" else f.data_start // 2
    short = tmp_path / "short.gguf"
    short.write_bytes(tiny_file.read_bytes()[:cut])
    with pytest.raises(WeightsError) as e:
        load_gguf(short)
    msg = one_line(e)
    assert msg.startswith(f"{short}: truncated"), msg
    if where == "data":
        assert f"the file has only {cut} bytes" in msg


def test_bad_version(tmp_path, tiny_file):
    data = bytearray(tiny_file.read_bytes())
    data[4:8] = (7).to_bytes(4, "little")
    bad = tmp_path / "v7.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsError) as e:
        load_gguf(bad)
    assert one_line(e) == f"{bad}: unsupported GGUF version 7: expected 2 or 3"


def test_unknown_architecture(tmp_path):
    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(WeightsError) as e:
        load_gguf(path)
    assert one_line(e) == f"{path}: unknown architecture 'llama': expected qwen2 or qwen2moe"


def test_missing_tensor(tmp_path):
    config = tiny_config(num_hidden_layers=4)
    write_tiny_gguf(tmp_path / "m.gguf", config, random_state_dict(config), skip=("blk.3.attn_q.weight",))
    with pytest.raises(WeightsError) as e:
        load_gguf(tmp_path / "m.gguf")
    assert one_line(e) == f"{tmp_path / 'm.gguf'}: missing tensor 'blk.3.attn_q.weight'"


def test_missing_moe_tensor(tmp_path):
    config = tiny_config(moe=True)
    write_tiny_gguf(tmp_path / "m.gguf", config, random_state_dict(config),
                    skip=("blk.1.ffn_up_exps.weight", "blk.1.ffn_gate_inp_shexp.weight"))
    with pytest.raises(WeightsError) as e:
        load_gguf(tmp_path / "m.gguf")
    assert one_line(e) == f"{tmp_path / 'm.gguf'}: missing tensor 'blk.1.ffn_up_exps.weight' (and 1 more)"


def test_shape_mismatch(tmp_path):
    """Metadata says feed_forward_length 96, the tensors are 128 wide."""
    meta_config = tiny_config(intermediate_size=96)
    tensors = random_state_dict(tiny_config(intermediate_size=128))
    write_tiny_gguf(tmp_path / "m.gguf", meta_config, tensors)
    with pytest.raises(WeightsError) as e:
        load_gguf(tmp_path / "m.gguf")
    assert one_line(e) == (f"{tmp_path / 'm.gguf'}: tensor 'blk.0.ffn_gate.weight' has shape (128, 64) "
                           f"but the config implies (96, 64)")


def test_shape_mismatch_heads(tmp_path):
    """Metadata says 2 kv heads of 16, the k projection has 4 heads' rows."""
    write_tiny_gguf(tmp_path / "m.gguf", tiny_config(num_key_value_heads=2),
                    random_state_dict(tiny_config(num_key_value_heads=4)))
    with pytest.raises(WeightsError, match=r"tensor 'blk.0.attn_k.weight' has shape \(64, 64\) but the config implies \(32, 64\)"):
        load_gguf(tmp_path / "m.gguf")


def test_config_from_gguf_errors():
    shapes = {"token_embd.weight": (10, 8)}
    base = {"general.architecture": "qwen2", "qwen2.block_count": 1, "qwen2.embedding_length": 8,
            "qwen2.attention.head_count": 2, "qwen2.feed_forward_length": 16}
    assert config_from_gguf(base, shapes).vocab_size == 10
    assert config_from_gguf(base, shapes).tie_word_embeddings
    with pytest.raises(WeightsError, match=r"^f.gguf: missing metadata 'qwen2.block_count'$"):
        config_from_gguf({k: v for k, v in base.items() if k != "qwen2.block_count"}, shapes, "f.gguf")
    with pytest.raises(WeightsError, match=r"missing metadata 'general.architecture'"):
        config_from_gguf({k: v for k, v in base.items() if k != "general.architecture"}, shapes)
    with pytest.raises(WeightsError, match=r"^GGUF: missing tensor 'token_embd.weight'$"):
        config_from_gguf(base, {})
    with pytest.raises(WeightsError, match=r"metadata 'qwen2.embedding_length' is 'x': expected a number"):
        config_from_gguf({**base, "qwen2.embedding_length": "x"}, shapes)
    with pytest.raises(WeightsError, match=r"does not describe a valid model: .*not a multiple"):
        config_from_gguf({**base, "qwen2.attention.head_count_kv": 3, "qwen2.attention.head_count": 4}, shapes)
    with pytest.raises(WeightsError, match=r"missing metadata 'qwen2moe.expert_count'"):
        config_from_gguf({**{k.replace("qwen2.", "qwen2moe."): v for k, v in base.items()},
                          "general.architecture": "qwen2moe"}, shapes)


def test_check_state_dict_errors():
    config = tiny_config()
    sd = random_state_dict(config)
    check_state_dict(sd, config)
    with pytest.raises(WeightsError, match=r"^ck: missing tensor 'model.norm.weight'$"):
        check_state_dict({k: v for k, v in sd.items() if k != "model.norm.weight"}, config, "ck")
    with pytest.raises(WeightsError, match=r"unexpected tensor 'extra'"):
        check_state_dict({**sd, "extra": torch.zeros(1)}, config, "ck")
    with pytest.raises(WeightsError, match=r"tensor 'model.norm.weight' has shape \(3,\) but the config implies \(64,\)"):
        check_state_dict({**sd, "model.norm.weight": torch.zeros(3)}, config, "ck")


def test_gguf_names_cover_every_tensor():
    for config in (tiny_config(), tiny_config(moe=True, tie_word_embeddings=True)):
        names = gguf_names(config)
        assert list(names) == list(expected_shapes(config))
        assert len(set(names.values())) == len(names)
    assert gguf_names(tiny_config())["lm_head.weight"] == "output.weight"
    assert gguf_names(tiny_config(moe=True))["model.layers.1.mlp.experts.down_proj"] == "blk.1.ffn_down_exps.weight"


# ---- the real Qwen2.5-Coder-0.5B-Instruct Q4_K_M file --------------------------------------------------

@pytest.fixture(scope="module")
def real_loaded(real_gguf_path):
    return load_gguf(real_gguf_path)


@pytest.mark.real_model
def test_real_config(real_loaded):
    config, state, meta = real_loaded
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("qwen2", 24, 896)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (14, 2, 64)
    assert (config.intermediate_size, config.vocab_size) == (4864, 151936)
    assert config.rope_theta == 1e6 and config.rms_norm_eps == 1e-6
    assert config.max_position_embeddings == 32768
    assert config.tie_word_embeddings is False
    assert (config.bos_token_id, config.eos_token_id) == (151643, 151645)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "qwen2"
    assert len(meta["tokenizer.ggml.tokens"]) == 151936
    assert set(state) == set(expected_shapes(config))
    assert len(state) == 291  # every tensor in the file, all used
    assert state["lm_head.weight"].shape == (151936, 896)
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (128, 896)


@pytest.mark.real_model
def test_real_tensors_match_gguf_reader(real_gguf_path, real_loaded):
    """One tensor of every type in the file, against gguf's own reader and dequantizer."""
    config, state, meta = real_loaded
    reader = gguf.GGUFReader(real_gguf_path)
    assert read_metadata(reader) == meta
    ours = {v: k for k, v in gguf_names(config).items()}
    seen = {}
    for t in reader.tensors:
        seen.setdefault(t.tensor_type, t)
    assert set(seen) == {Q.Q5_0, Q.Q8_0, Q.Q6_K, Q.Q4_K, Q.F32}
    parsed = open_gguf(real_gguf_path).tensor_map
    for t in reader.tensors:
        assert parsed[t.name].data_offset == t.data_offset and parsed[t.name].tensor_type == t.tensor_type
    for qtype, t in seen.items():
        want = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, qtype), dtype=np.float32))
        want = want.reshape(tuple(reversed(t.shape.tolist())))
        assert torch.equal(state[ours[t.name]], want), (qtype.name, t.name)
    # The biggest tensor (the untied output, Q8_0) too.
    out = next(t for t in reader.tensors if t.name == "output.weight")
    assert torch.equal(state["lm_head.weight"], torch.from_numpy(gguf.quants.dequantize(out.data, out.tensor_type)))


@pytest.mark.real_model
def test_real_truncated_copy(real_gguf_path, tmp_path):
    short = tmp_path / "short.gguf"
    with open(real_gguf_path, "rb") as src, open(short, "wb") as dst:
        dst.write(src.read(50_000_000))
    with pytest.raises(WeightsError) as e:
        load_gguf(short)
    assert one_line(e).startswith(f"{short}: truncated: tensor '")
