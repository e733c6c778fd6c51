"""The Qwen1.5 / Qwen2 decoder in plain PyTorch: RMSNorm, RoPE, grouped-query attention, MLP, MoE.

Module and parameter names follow transformers' Qwen2ForCausalLM so that a checkpoint's state dict maps
onto this model one to one (MoE experts are stacked into [experts, out, in] tensors). The model is
stateless between calls: a KV cache object is passed in, which keeps the engine free to choose its
own cache layout. The cache only needs `update(layer, k, v, start_pos) -> (keys, values)`.

With compact (block-int8) weights on the CPU, a forward of one sequence of up to 64 tokens through the
engine's cache runs these same layers as one C call instead (quant/layers.c, the same math in C loops).

start_pos is a Python int (eager: the cache returns just the filled positions) or a one-element tensor
(static shapes for torch.compile / CUDA graphs: the cache returns its whole length and the mask hides
the positions not yet written).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .quant.modules import fuse_state, linear, quantize_model


class LayerCache(Protocol):
    def update(self, layer: int, k: Tensor, v: Tensor, start_pos: int | Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v ([B, kv_heads, T, head_dim]) at start_pos; return all keys/values so far."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalised in float32 whatever the activation dtype, then scaled in the activation dtype, as the
        # reference does (x * rsqrt(mean(x^2) + eps)); F.rms_norm is one op instead of five.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables [..., head_dim] for absolute positions [...] ([T], or [B, T] per row; NeoX rotate-half).

    The sin table carries rotate-half's sign (its first half negated), so apply_rope needs one roll."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # [..., D/2]
    sin = freqs.sin()
    return torch.cat((freqs, freqs), dim=-1).cos().to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, heads, T, D]: the first half of each head is paired with the second half.

    x * cos + rotate_half(x) * sin, where rotate_half(x) = [-x2, x1]: rolling x by half gives [x2, x1],
    and the table's sign does the rest (two ops fewer per call than slicing and concatenating)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


def attention_mask(q_len: int, k_len: int, start_pos: int | Tensor, window: int | None, device) -> Tensor | None:
    """Boolean mask [q_len, k_len] (True = may attend) for queries at start_pos.., or None if causal-free."""
    static = isinstance(start_pos, Tensor)
    if q_len == 1 and not static and (window is None or k_len <= window):
        return None  # one new token sees the whole cache
    q_pos = (start_pos + torch.arange(q_len, device=device))[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


class Attention(nn.Module):
    """Multi-head attention with grouped kv heads: query head i reads kv head i // (heads / kv_heads)."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.sliding_window if config.uses_sliding_window(layer) else None
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=False)
        # Compact (block-int8) weights fuse q/k/v into one matrix: one kernel call reads all three.
        self.qkv_proj: nn.Module | None = None
        self.rows_as_decode = False  # see rows_as_decode_steps()

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        kv = self.kv_heads * self.head_dim
        return self.qkv_proj(x).split((self.heads * self.head_dim, kv, kv), dim=-1)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: LayerCache | None,
                start_pos: int | Tensor, mask: Tensor | None = None) -> Tensor:
        """mask: an explicit boolean mask (broadcastable to [B, heads, T, S]) for batches of rows at different
        positions (the serving engine's paged cache); None builds the causal mask from start_pos."""
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.reshape(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.reshape(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, T, D]
        v = v.reshape(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, start_pos)  # all positions so far: [B, KV, S, D]
        gqa = self.kv_heads != self.heads
        if self.rows_as_decode and T > 1 and mask is None and isinstance(start_pos, int) and self.window is None:
            # Each query row attends exactly as a one-token decode step would (one call over all rows
            # may sum in another order), so speculative verification reproduces plain greedy bit for bit.
            end = start_pos + 1
            out = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + 1], k[:, :, :end + i], v[:, :, :end + i],
                                                            enable_gqa=gqa) for i in range(T)], dim=2)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))
        if mask is None:
            mask = attention_mask(T, k.shape[2], start_pos, self.window, x.device)
        # SDPA applies the scale 1/sqrt(head_dim) and runs the softmax in float32 for half inputs.
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            enable_gqa=gqa,
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.gate_up_proj: nn.Module | None = None  # fused gate and up (compact weights): one kernel call

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return self.down_proj(F.silu(gate) * up)
        # Inference: silu and the product in place, in the gate's half of gate_up (same bits), so that a
        # prefill chunk's peak holds no [T, intermediate] array beside gate_up (10 MB of a 512-token chunk
        # on the 0.5B; down_proj reads the strided half as it is)
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))


class Experts(nn.Module):
    """The routed experts, stacked: gate/up [E, I, H], down [E, H, I]."""

    def __init__(self, experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(experts, intermediate, hidden))
        self.up_proj = nn.Parameter(torch.empty(experts, intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, intermediate))

    def forward(self, x: Tensor, expert_ids: Tensor, weights: Tensor) -> Tensor:
        """x [N, H]; expert_ids, weights [N, top_k]. Each expert runs once on the tokens routed to it."""
        out = torch.zeros_like(x)
        flat_ids = expert_ids.flatten()
        for e in flat_ids.unique().tolist():
            token, slot = torch.where(expert_ids == e)
            h = x[token]
            h = F.linear(F.silu(F.linear(h, self.gate_proj[e])) * F.linear(h, self.up_proj[e]), self.down_proj[e])
            out.index_add_(0, token, h * weights[token, slot, None])
        return out


class MoE(nn.Module):
    """Softmax router over routed experts (top-k), plus one always-on shared expert behind a sigmoid gate."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        probs = F.softmax(self.gate(flat), dim=-1, dtype=torch.float32)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        routed = self.experts(flat, expert_ids, weights.to(x.dtype))
        shared = torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return (routed + shared).view(B, T, H)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MoE(config) if config.is_moe_layer(layer) else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: LayerCache | None,
                start_pos: int | Tensor, mask: Tensor | None = None) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start_pos, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderStack(nn.Module):
    """`model.*` in checkpoints: embeddings, the layers and the final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        # An uninitialised table: Embedding's own normal_ init on the meta device (how build_model builds before
        # loading) imports torch._dynamo and sympy, a second or more of every load; build_model initialises
        # random models itself.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    """Qwen2ForCausalLM: token ids [B, T] -> logits [B, T, vocab] (or [B, 1, vocab] with last_only)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        # A tied head reads the embedding table; only an untied one has weights of its own.
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._native = None  # quant.native_layers.NativeLayers, or False where it does not apply (first use)

    @property
    def output_weight(self) -> Tensor:
        """The dense head matrix (not available when the head is kept block-int8 quantized)."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def head(self, h: Tensor) -> Tensor:
        """Logits from final hidden states: lm_head, or the embedding table when tied (dense or block int8)."""
        return linear(h, self.model.embed_tokens if self.lm_head is None else self.lm_head)

    def hidden_states(self, input_ids: Tensor, cache: LayerCache | None = None,
                      start_pos: int | Tensor = 0, positions: Tensor | None = None,
                      mask: Tensor | None = None) -> Tensor:
        """Final-normed hidden states [B, T, H] for tokens at positions start_pos .. start_pos+T-1.

        positions [B, T] and mask [B, 1, T, S] instead place each row at its own positions (batched serving:
        the cache then knows where each row's keys go and returns S keys per row)."""
        x = self.model.embed_tokens(input_ids)
        if positions is None:
            positions = start_pos + torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        if cos.dim() == 3:  # per-row positions: [B, T, D] -> [B, 1, T, D] to broadcast over heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if mask is None and cos.dim() == 2 and self._native_applies(input_ids, cache, start_pos):
            # Compact weights, one sequence, a few tokens (decode): all layers in one C call.
            return self.model.norm(self._native.forward(x, cos, sin, cache, start_pos))
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, start_pos, mask)
        return self.model.norm(x)

    def _native_applies(self, input_ids: Tensor, cache, start_pos) -> bool:
        if self._native is None:
            from .quant import native_layers

            self._native = native_layers.NativeLayers(self) if native_layers.supported(self) else False
        return bool(self._native) and not torch.is_grad_enabled() and self._native.applies(input_ids, cache, start_pos)

    def forward(self, input_ids: Tensor, cache: LayerCache | None = None, start_pos: int | Tensor = 0,
                last_only: bool = False, positions: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        h = self.hidden_states(input_ids, cache, start_pos, positions, mask)
        if last_only:
            h = h[:, -1:]  # generation needs only the next-token logits: skip the rest of the vocab matmul
        return self.head(h)


@contextmanager
def rows_as_decode_steps(model: "Transformer"):
    """Within this block, a multi-token forward through a KV cache computes each row's attention as a
    one-token decode step would. Matmuls, norms and RoPE are already row by row, so the logits equal a
    token-by-token decode's bit for bit: speculative verification relies on it to keep greedy output
    identical to the target's alone (near-ties would otherwise flip with summation order)."""
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    for a in attns:
        a.rows_as_decode = True
    try:
        yield model
    finally:
        for a in attns:
            a.rows_as_decode = False


def build_model(config: ModelConfig, state_dict: dict[str, Tensor] | None = None,
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """A model holding state_dict's tensors (no copy when dtype/device already match), or random init.

    Entries that are `quant.blocks.BlockInt8` (load_gguf(keep_quantized=True)) become QuantLinear /
    QuantEmbedding modules that keep the weight compact (CPU, float32 activations); they are popped
    from state_dict."""
    if state_dict is None:
        with torch.device(device):
            model = Transformer(config).to(dtype)
        for name, p in model.named_parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)
        return model.eval()
    with torch.device("meta"):
        model = Transformer(config)
    # The BlockInt8 entries move out of the caller's dict into the modules (so that fusing q/k/v below
    # frees the parts instead of holding two copies); dense entries are left where they are.
    held = quantize_model(model, fuse_state(state_dict))
    state_dict = dict(state_dict)
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if k not in held]
    if missing or unexpected:
        from .errors import WeightsError

        raise WeightsError(f"state dict does not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()
