"""`qwen15 plan`: how much memory a model needs, and how many devices of a given size.

Weights in the chosen storage format, the KV cache (2 x layers x kv_heads x head_dim x bytes per token of
context: grouped-query attention divides it by heads / kv_heads), the transient activations of a prefill
chunk, and the runtime's own footprint. The seeds' case for 32B and 110B is exactly this arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import ModelConfig, get_preset
from .errors import ConfigError

GiB = 1024 ** 3

# Bytes per weight at run time. int8/int4 are weight-only, group-wise (group 32, one bf16 scale and for
# int4 one bf16 zero per group); q4_k_m is llama.cpp's mix (~4.85 bits per weight on large models).
BYTES_PER_WEIGHT = {
    "fp32": 4.0, "bf16": 2.0, "fp16": 2.0,
    "int8": 1.0 + 2 / 32, "int4": 0.5 + 4 / 32,
    "q4_k_m": 4.85 / 8,
}
# GGUF tensors at run time (qwen15.quant, --quant gguf): the types the kernels read as stored keep the
# file's size; the others become block int8 (int8 values + a float32 scale and offset per block of 32).
GGUF_RUNTIME_BYTES = {
    "Q8_0": 34 / 32, "Q5_0": 22 / 32, "Q4_0": 18 / 32, "Q4_K": 144 / 256, "Q6_K": 210 / 256,
    "Q5_1": 1 + 8 / 32, "Q4_1": 1 + 8 / 32, "Q5_K": 1 + 8 / 32, "F32": 4.0, "F16": 4.0, "BF16": 4.0,
}
RUNTIME_OVERHEAD = {"cpu": 0.30 * GiB, "cuda": 0.60 * GiB}  # interpreter + torch (+ CUDA context)
PREFILL_CHUNK = 512


@dataclass
class Plan:
    model: str
    quant: str
    device: str
    params: int
    context: int
    batch: int
    weights_bytes: int
    kv_cache_bytes: int
    kv_bytes_per_token: int
    activation_bytes: int
    overhead_bytes: int
    total_bytes: int
    gpu_mem_gb: float | None
    devices_needed: int | None
    tp: int | None = None  # tensor-parallel degree (parallel/tp.py); None: one device holds it all
    per_rank_bytes: int | None = None  # the largest rank's weights shard, KV cache, activations and runtime

    def as_dict(self) -> dict:
        return asdict(self)


def _activation_bytes(config: ModelConfig, context: int, batch: int, act_bytes: int) -> int:
    """The largest transient of one prefill chunk: MLP intermediates, attention scores, hidden states."""
    chunk = min(PREFILL_CHUNK, context)
    tokens = batch * chunk
    mlp_width = max(config.intermediate_size,
                    config.num_experts_per_tok * config.moe_intermediate_size + config.shared_expert_intermediate_size)
    mlp = 3 * tokens * mlp_width
    scores = batch * config.num_attention_heads * chunk * context
    hidden = 6 * tokens * config.hidden_size
    logits = batch * config.vocab_size  # only the last position's logits are computed
    return (max(mlp, scores) + hidden + logits) * act_bytes


def _gguf_weights(path: Path) -> tuple[ModelConfig, int]:
    from .weights.gguf import config_from_gguf, open_gguf

    f = open_gguf(path)
    shapes = {t.name: t.torch_shape for t in f.tensors}
    config = config_from_gguf(f.metadata, shapes, path)
    total = sum(t.n_elements * GGUF_RUNTIME_BYTES.get(t.tensor_type.name, 4.0) for t in f.tensors)
    return config, int(total)


def make_plan(model: str, quant: str | None = None, context: int | None = None, batch: int = 1,
              gpu_mem_gb: float | None = None, device: str | None = None, tp: int | str | None = None) -> Plan:
    """tp: a tensor-parallel degree, or "auto": the smallest valid degree whose largest rank fits gpu_mem_gb."""
    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    if gpu_mem_gb is not None and gpu_mem_gb <= 0:
        raise ConfigError(f"gpu-mem must be > 0 GB, got {gpu_mem_gb}")
    device = device or ("cuda" if gpu_mem_gb else "cpu")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r}: expected cpu or cuda")
    path = Path(model).expanduser()
    from .weights.packaged import PACKAGED_MODELS

    if model.lower() in PACKAGED_MODELS:  # a packaged name: its .gguf (pulled on first use)
        from .weights.resolve import resolve_model

        path = resolve_model(model)
    weights_bytes = None
    if path.suffix == ".gguf" or path.is_file():
        if not path.is_file():
            raise ConfigError(f"{path}: file not found")
        config, gguf_bytes = _gguf_weights(path)
        quant = quant or "gguf"
        if quant == "gguf":
            weights_bytes = gguf_bytes
    elif path.is_dir():
        config = ModelConfig.from_hf_config(path)
    else:
        config = get_preset(model)
    quant = quant or ("bf16" if device == "cuda" else "fp32")
    if weights_bytes is None:
        if quant not in BYTES_PER_WEIGHT:
            raise ConfigError(f"unknown quant {quant!r}: expected one of {', '.join(BYTES_PER_WEIGHT)}"
                              + (", gguf" if path.suffix == ".gguf" else ""))
        # Norms and biases stay in full precision; they are a rounding error next to the matrices.
        weights_bytes = int(config.num_parameters() * BYTES_PER_WEIGHT[quant])
    context = context or config.max_position_embeddings
    if context < 1:
        raise ConfigError(f"context must be >= 1, got {context}")
    act_bytes = 2 if device == "cuda" else 4
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * act_bytes
    kv = kv_per_token * context * batch
    activations = _activation_bytes(config, context, batch, act_bytes)
    overhead = int(RUNTIME_OVERHEAD["cuda" if device == "cuda" else "cpu"])
    total = weights_bytes + kv + activations + overhead
    devices = None
    if gpu_mem_gb:
        usable = gpu_mem_gb * GiB * 0.92  # the allocator's fragmentation and the driver keep some back
        smallest, piece = _smallest_device(config, weights_bytes, kv_per_token * context * batch, activations, overhead)
        if usable < smallest:
            raise ConfigError(f"{model} ({quant}) does not fit on {gpu_mem_gb:g} GB devices, however many: each "
                              f"needs at least {smallest / GiB / 0.92:.1f} GB (the runtime, {piece} and the "
                              f"activations); total {total / GiB:.1f} GiB")
        devices = max(1, math.ceil(total / usable))
    plan = Plan(model=model, quant=quant, device=device, params=config.num_parameters(), context=context,
                batch=batch, weights_bytes=int(weights_bytes), kv_cache_bytes=int(kv),
                kv_bytes_per_token=int(kv_per_token), activation_bytes=int(activations),
                overhead_bytes=overhead, total_bytes=int(total), gpu_mem_gb=gpu_mem_gb, devices_needed=devices)
    if tp is not None:
        _plan_tp(plan, config, tp, act_bytes)
    return plan


def _rank_bytes(plan: Plan, config: ModelConfig, world: int, act_bytes: int) -> int:
    """The largest rank's memory at degree `world`: its shard of the layers plus the replicated embeddings and
    head (weights scale with its parameters), its own kv heads, and a prefill chunk's activations."""
    from .parallel.tp import local_config, plan as shard_plan

    configs = [local_config(config, s) for s in shard_plan(config, world)]
    params = max(c.num_parameters() for c in configs)
    weights = plan.weights_bytes * params / plan.params
    kv = max(2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * act_bytes for c in configs)
    activations = max(_activation_bytes(c, plan.context, plan.batch, act_bytes) for c in configs)
    return int(weights + kv * plan.context * plan.batch + activations + plan.overhead_bytes)


def _plan_tp(plan: Plan, config: ModelConfig, tp: int | str, act_bytes: int) -> None:
    from .parallel.tp import valid_degrees

    valid = valid_degrees(config)
    if tp == "auto":
        if not plan.gpu_mem_gb:
            raise ConfigError("--tp auto needs --gpu-mem: the memory of one device in GB")
        usable = plan.gpu_mem_gb * GiB * 0.92
        fits = [n for n in valid if _rank_bytes(plan, config, n, act_bytes) <= usable]
        if not fits:
            biggest = valid[-1]
            raise ConfigError(f"{plan.model} does not fit {plan.gpu_mem_gb:g} GB devices at any valid --tp "
                              f"({', '.join(map(str, valid))}): --tp {biggest} needs "
                              f"{_rank_bytes(plan, config, biggest, act_bytes) / GiB:.1f} GiB per rank")
        degree = fits[0]
    else:
        try:
            degree = int(tp)
        except ValueError:
            raise ConfigError(f"--tp {tp!r}: expected a number of ranks or 'auto'") from None
        if degree not in valid:
            raise ConfigError(f"--tp {degree} does not split {config.num_attention_heads} query / "
                              f"{config.num_key_value_heads} kv heads: expected one of {', '.join(map(str, valid))}")
    plan.tp = degree
    plan.per_rank_bytes = _rank_bytes(plan, config, degree, act_bytes)
    plan.devices_needed = degree


def _smallest_device(config: ModelConfig, weights: int, kv: int, activations: int, overhead: int) -> tuple[int, str]:
    """Bytes the least-loaded device of a layer-wise split still holds: its runtime, the largest piece that
    cannot be split further (the embedding table or one decoder layer with its KV cache), the activations."""
    per_weight = weights / config.num_parameters()
    embed = config.vocab_size * config.hidden_size * per_weight
    layer = (weights - embed * (1 if config.tie_word_embeddings else 2)) / config.num_hidden_layers
    layer_kv = kv / config.num_hidden_layers
    if embed >= layer + layer_kv:
        size, what = embed, f"{embed / GiB:.2f} GiB for the embedding table"
    else:
        size, what = layer + layer_kv, f"{(layer + layer_kv) / GiB:.2f} GiB for one layer with its KV cache"
    return int(overhead + size + activations), what


def format_plan(plan: Plan) -> str:
    def gb(n: int) -> str:
        return f"{n / GiB:8.2f} GiB"

    lines = [
        f"model        {plan.model}  ({plan.params / 1e9:.3f}B params, {plan.quant}, {plan.device})",
        f"weights      {gb(plan.weights_bytes)}",
        f"KV cache     {gb(plan.kv_cache_bytes)}  ({plan.kv_bytes_per_token / 1024:.0f} KiB/token x "
        f"{plan.context} tokens x batch {plan.batch})",
        f"activations  {gb(plan.activation_bytes)}",
        f"runtime      {gb(plan.overhead_bytes)}",
        f"total        {gb(plan.total_bytes)}",
    ]
    if plan.tp is not None:
        lines.append(f"per rank     {gb(plan.per_rank_bytes)}  (--tp {plan.tp}: the largest rank's shard, "
                     f"its kv heads, replicated embeddings and head)")
    if plan.devices_needed is not None:
        lines.append(f"devices      {plan.devices_needed} x {plan.gpu_mem_gb:g} GB" if plan.gpu_mem_gb else
                     f"devices      {plan.devices_needed}")
    return "\n".join(lines)
