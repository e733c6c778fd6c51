"""The tensor-parallel plan (Megatron's, as in gpt-fast's tp.py and torchtitan's parallelize.py).

Each rank holds a contiguous range of query heads with the kv heads they read, and a range of the MLP's
intermediate rows:
- q/k/v and gate/up are column-parallel: the rank keeps the output rows (and bias entries) of its heads /
  intermediate range, so its attention and SiLU run on its own heads and rows with no communication;
- o and down are row-parallel: the rank keeps the matching input columns, and one all-reduce (a forward
  hook on the module) sums the ranks' partial outputs into the full hidden state;
- the embedding table and lm_head are replicated, and only rank 0 computes logits (it samples): on this
  CPU a vocabulary split was no faster and adds a gather (and an all-reduce for the lookup) per step
  (benchmarks/results/tp_cpu.md).

Plain sharded tensors and explicit all-reduces, not DTensor: the model file stays as it is (an attention
module reads its local head counts from the per-rank config it is built from), and the whole plan is the
slicing below plus two hooks a layer.

The degree N must divide the kv heads, or be a multiple of them: then each kv head is replicated on
N / kv ranks (as vLLM does) and its group of query heads is split among them, unevenly where it must be
(the 0.5B's 14/2 heads at N = 4: ranks hold 3, 4, 3 and 4 query heads, one kv head each).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ModelConfig
from ..errors import ConfigError
from ..model import Transformer, build_model
from ..quant.modules import QuantEmbedding, QuantLinear
from .group import TPGroup


@dataclass(frozen=True)
class Shard:
    """What one rank holds: [start, end) ranges of query heads, kv heads and MLP intermediate rows."""

    rank: int
    world: int
    heads: tuple[int, int]
    kv_heads: tuple[int, int]
    mlp: tuple[int, int]


def valid_degrees(config: ModelConfig) -> list[int]:
    """Every TP degree this model can be split into: divisors of its kv heads, and multiples of them up to
    one query head per rank (replicated kv heads)."""
    kv, groups = config.num_key_value_heads, config.kv_groups
    return [n for n in range(1, kv + 1) if kv % n == 0] + [kv * m for m in range(2, groups + 1)]


def plan(config: ModelConfig, world: int) -> list[Shard]:
    """Each rank's shard, or a one-line error naming the degrees that are valid."""
    if config.is_moe:
        raise ConfigError(f"tensor parallelism shards dense models; {config.model_type} (mixture of experts) "
                          f"runs with --tp 1")
    valid = valid_degrees(config)
    if world not in valid:
        raise ConfigError(f"--tp {world} does not split {config.num_attention_heads} query / "
                          f"{config.num_key_value_heads} kv heads: expected one of {', '.join(map(str, valid))}")
    kv, groups, inter = config.num_key_value_heads, config.kv_groups, config.intermediate_size
    shards = []
    for r in range(world):
        if world <= kv:
            per = kv // world
            kv_range = (r * per, (r + 1) * per)
            heads = (kv_range[0] * groups, kv_range[1] * groups)
        else:
            m = world // kv  # ranks sharing one kv head; its `groups` query heads split among them
            j, part = divmod(r, m)
            kv_range = (j, j + 1)
            heads = (j * groups + part * groups // m, j * groups + (part + 1) * groups // m)
        mlp = (r * inter // world, (r + 1) * inter // world)
        shards.append(Shard(r, world, heads, kv_range, mlp))
    return shards


def local_config(config: ModelConfig, shard: Shard) -> ModelConfig:
    """The config a rank's modules are built from: its own head counts and MLP width (caches size from it)."""
    return dataclasses.replace(config, num_attention_heads=shard.heads[1] - shard.heads[0],
                               num_key_value_heads=shard.kv_heads[1] - shard.kv_heads[0],
                               intermediate_size=shard.mlp[1] - shard.mlp[0])


def shard_state(state: dict[str, Tensor], config: ModelConfig, shard: Shard) -> dict[str, Tensor]:
    """The rank's slices of a full (dense) state dict, copied: the full tensors can be freed after."""
    d = config.head_dim
    h0, h1 = shard.heads[0] * d, shard.heads[1] * d
    k0, k1 = shard.kv_heads[0] * d, shard.kv_heads[1] * d
    m0, m1 = shard.mlp
    rows = {"q_proj": (h0, h1), "k_proj": (k0, k1), "v_proj": (k0, k1), "gate_proj": (m0, m1), "up_proj": (m0, m1)}
    cols = {"o_proj": (h0, h1), "down_proj": (m0, m1)}
    out = {}
    for name, t in state.items():
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
        if module in rows:
            a, b = rows[module]
            out[name] = t[a:b].clone()  # weight rows, or bias entries
        elif module in cols and name.endswith(".weight"):
            a, b = cols[module]
            out[name] = t[:, a:b].clone()
        elif module in cols:
            raise ConfigError(f"{name}: a row-parallel bias is not supported")
        else:
            out[name] = t  # norms, embeddings, lm_head: replicated
    return out


def _row_parallel_hook(group: TPGroup):
    def reduce(module, inputs, output: Tensor) -> Tensor:
        return group.all_reduce(output)  # the ranks' partial sums -> the full hidden state, on every rank

    return reduce


def parallelize(model: Transformer, group: TPGroup) -> Transformer:
    """Install the all-reduces on a rank's shard (built from local_config): one after o, one after down."""
    for layer in model.model.layers:
        layer.self_attn.o_proj.register_forward_hook(_row_parallel_hook(group))
        layer.mlp.down_proj.register_forward_hook(_row_parallel_hook(group))
    model.tp = group
    return model


# ---- rank 0 hands out the shards ------------------------------------------------------------------

def distribute(model: Transformer, group: TPGroup, device: str | torch.device, dtype: torch.dtype) -> Transformer:
    """Rank 0: send every follower its shard of the full model (read once, here), keep its own.

    Returns rank 0's shard; the full model's tensors are released as they are sliced."""
    config = model.config
    shards = plan(config, group.world)
    if any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules()):
        raise ConfigError("tensor parallelism shards dense weights: use --quant none")
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    del model
    metas = [[(k, tuple(v.shape), v.dtype) for k, v in shard_state(_meta_state(state), config, s).items()]
             for s in shards]
    group.send(_receive_shard, config, shards, metas, str(device), dtype)
    for s in shards[1:]:
        for _, t in shard_state(state, config, s).items():
            group.send_tensor(t, s.rank)
    own = shard_state(state, config, shards[0])
    state.clear()
    local = build_model(local_config(config, shards[0]), own, device=group.device, dtype=dtype)
    local.config = local_config(config, shards[0])
    return leader(parallelize(local, group))


def _meta_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}


def _receive_shard(state, config: ModelConfig, shards: list[Shard], metas, device: str, dtype: torch.dtype) -> None:
    """Follower: receive this rank's tensors from rank 0 and build its shard of the model."""
    from .group import rank_device

    group = state.group
    shard = shards[group.rank]
    tensors = {name: group.recv_tensor(torch.empty(shape, dtype=dt)) for name, shape, dt in metas[group.rank]}
    group.device = rank_device(device, group.rank)
    state.model = parallelize(build_model(local_config(config, shard), tensors, device=group.device, dtype=dtype),
                              group)
    state.caches = {}


# ---- rank 0's forwards run on every rank ------------------------------------------------------------

_cache_keys = itertools.count(1)


def leader(model: Transformer) -> Transformer:
    """Rank 0: every forward of the model first sends the followers the same forward (inputs and cache)."""
    signature = inspect.signature(model.forward)

    def send_forward(module, args, kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        cache = a["cache"]
        spec = None
        if cache is not None:
            if not hasattr(cache, "max_len"):
                raise ConfigError(f"{type(cache).__name__}: tensor-parallel forwards take a KVCache")
            if not hasattr(cache, "_tp_key"):
                cache._tp_key = next(_cache_keys)
            spec = (type(cache), cache._tp_key, cache.max_len, cache.k.shape[1])
        model.tp.send(_forward, spec, a["input_ids"], a["start_pos"], a["positions"], a["mask"])

    model.register_forward_pre_hook(send_forward, with_kwargs=True)
    return model


def _forward(state, spec, input_ids: Tensor, start_pos, positions, mask) -> None:
    """Follower: the same forward over its shard and its own cache (logits are rank 0's alone)."""
    model = state.model
    cache = None
    if spec is not None:
        cls, key, max_len, batch = spec
        cache = state.caches.get(key)
        if cache is None:  # a new generation: its cache replaces the last one's
            cache = cls(model.config, max_len, batch, dtype=model.dtype, device=model.device)
            state.caches = {k: v for k, v in state.caches.items() if not isinstance(k, int)}
            state.caches[key] = cache
    dev = model.device
    to = (lambda t: t.to(dev) if isinstance(t, Tensor) else t)
    model.hidden_states(to(input_ids), cache, to(start_pos), to(positions), to(mask))
