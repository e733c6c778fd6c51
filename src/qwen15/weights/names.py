"""Our tensor names (transformers' checkpoint names, MoE experts stacked) and the shapes a config implies."""

from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig
from ..errors import WeightsError


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model holds, with its shape [out_features, in_features] like nn.Linear."""
    H, V, D = config.hidden_size, config.vocab_size, config.head_dim
    q, kv = config.num_attention_heads * D, config.num_key_value_heads * D
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (q, H), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, H), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (H, q),
        })
        if config.is_moe_layer(i):
            E, Im, Is = config.num_experts, config.moe_intermediate_size, config.shared_expert_intermediate_size
            shapes.update({
                p + "mlp.gate.weight": (E, H),
                p + "mlp.experts.gate_proj": (E, Im, H), p + "mlp.experts.up_proj": (E, Im, H),
                p + "mlp.experts.down_proj": (E, H, Im),
                p + "mlp.shared_expert.gate_proj.weight": (Is, H), p + "mlp.shared_expert.up_proj.weight": (Is, H),
                p + "mlp.shared_expert.down_proj.weight": (H, Is), p + "mlp.shared_expert_gate.weight": (1, H),
            })
        else:
            I = config.intermediate_size
            shapes.update({p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                           p + "mlp.down_proj.weight": (H, I)})
    return shapes


# GGUF block tensor names (llama.cpp) to ours, "{i}" the layer.
GGUF_TO_OURS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.ffn_gate_inp.weight": "model.layers.{i}.mlp.gate.weight",
    "blk.{i}.ffn_gate_exps.weight": "model.layers.{i}.mlp.experts.gate_proj",
    "blk.{i}.ffn_up_exps.weight": "model.layers.{i}.mlp.experts.up_proj",
    "blk.{i}.ffn_down_exps.weight": "model.layers.{i}.mlp.experts.down_proj",
    "blk.{i}.ffn_gate_inp_shexp.weight": "model.layers.{i}.mlp.shared_expert_gate.weight",
    "blk.{i}.ffn_gate_shexp.weight": "model.layers.{i}.mlp.shared_expert.gate_proj.weight",
    "blk.{i}.ffn_up_shexp.weight": "model.layers.{i}.mlp.shared_expert.up_proj.weight",
    "blk.{i}.ffn_down_shexp.weight": "model.layers.{i}.mlp.shared_expert.down_proj.weight",
}


def gguf_name_map(num_layers: int) -> dict[str, str]:
    """Every concrete GGUF tensor name to ours."""
    out = {}
    for g, o in GGUF_TO_OURS.items():
        if "{i}" in g:
            for i in range(num_layers):
                out[g.format(i=i)] = o.format(i=i)
        else:
            out[g] = o
    return out


def gguf_names(config: ModelConfig) -> dict[str, str]:
    """Every tensor the config implies (our name) to its GGUF name, in expected_shapes order."""
    to_gguf = {ours: g for g, ours in gguf_name_map(config.num_hidden_layers).items()}
    return {ours: to_gguf[ours] for ours in expected_shapes(config)}


def check_state_dict(state: dict, config: ModelConfig, source: str | Path = "checkpoint") -> None:
    """Raise WeightsError (one line, naming `source`) unless `state` holds exactly the tensors the
    config implies, each with the implied shape."""
    shapes = expected_shapes(config)
    missing = [n for n in shapes if n not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{source}: missing tensor '{missing[0]}'{more}")
    extra = [n for n in state if n not in shapes]
    if extra:
        raise WeightsError(f"{source}: unexpected tensor '{extra[0]}': the config implies no such tensor")
    for name, want in shapes.items():
        got = tuple(state[name].shape)
        if got != want:
            raise WeightsError(f"{source}: tensor '{name}' has shape {got} but the config implies {want}")
