"""Model configuration: one dataclass with Hugging Face field names, and a preset for every Qwen1.5 size.

Field names follow `Qwen2Config` / `Qwen2MoeConfig` verbatim so that a `config.json` maps onto this
class without a translation table. Parameter counts are computed from the shapes, never typed in.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from .errors import ConfigError


SUPPORTED_MODEL_TYPES = ("qwen2", "qwen2_moe")


@dataclass
class ModelConfig:
    model_type: str = "qwen2"
    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    use_sliding_window: bool = False
    sliding_window: int | None = 32768
    max_window_layers: int = 28
    layer_types: list[str] | None = None  # transformers>=5 spells the sliding-window layers out
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151643
    torch_dtype: str = "bfloat16"
    # Mixture of experts (model_type "qwen2_moe"); zero experts means a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}: expected one of {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"unsupported hidden_act {self.hidden_act!r}: expected 'silu'")

    # ---- derived shapes -------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def kv_groups(self) -> int:
        """How many query heads share one kv head (1 = plain multi-head attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def is_moe_layer(self, layer: int) -> bool:
        # Same rule as transformers' Qwen2MoeDecoderLayer.
        return (
            self.is_moe
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    def uses_sliding_window(self, layer: int) -> bool:
        if not (self.use_sliding_window and self.sliding_window):
            return False
        if self.layer_types is not None:
            return self.layer_types[layer] == "sliding_attention"
        return layer >= self.max_window_layers

    # ---- parameter counts -----------------------------------------------------------------------
    def _attention_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        q = h * self.num_attention_heads * d + self.num_attention_heads * d
        kv = 2 * (h * self.num_key_value_heads * d + self.num_key_value_heads * d)
        o = self.num_attention_heads * d * h
        return q + kv + o

    def _mlp_params(self, layer: int, active: bool) -> int:
        h = self.hidden_size
        if not self.is_moe_layer(layer):
            return 3 * h * self.intermediate_size
        experts = self.num_experts_per_tok if active else self.num_experts
        router = h * self.num_experts
        routed = experts * 3 * h * self.moe_intermediate_size
        shared = 3 * h * self.shared_expert_intermediate_size + h if self.shared_expert_intermediate_size else 0
        return router + routed + shared

    def num_parameters(self, active: bool = False) -> int:
        """Total parameters; with active=True, those one token uses (routed experts: top-k only)."""
        h = self.hidden_size
        per_layer = sum(self._attention_params() + self._mlp_params(i, active) + 2 * h for i in range(self.num_hidden_layers))
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embed + per_layer + h + head

    # ---- (de)serialisation ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from a config.json dict, keeping known fields and ignoring the rest."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known and v is not None}
        if "model_type" not in data:
            raise ConfigError("config has no 'model_type': expected 'qwen2' or 'qwen2_moe'")
        if data.get("dtype") and "torch_dtype" not in data:  # transformers>=5 writes "dtype"
            kwargs["torch_dtype"] = data["dtype"]
        # transformers>=5 nests rope_theta in rope_parameters; older files may carry rope_scaling.
        rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"bad rope_parameters {rope!r}: expected an object")
        if "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"unsupported rope_type {rope_type!r}: expected 'default' (no RoPE scaling)")
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"bad config: {e}") from None

    @classmethod
    def from_hf_config(cls, path: str | Path) -> "ModelConfig":
        """Read a Hugging Face `config.json` (path to the file or to its directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _qwen15(**overrides: Any) -> ModelConfig:
    return ModelConfig(**overrides)


# Every Qwen1.5 size, from the official config.json files (SPEC section 1).
PRESETS: dict[str, ModelConfig] = {
    "qwen1.5-0.5b": _qwen15(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                            num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=True),
    "qwen1.5-1.8b": _qwen15(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                            num_attention_heads=16, num_key_value_heads=16),
    "qwen1.5-4b": _qwen15(hidden_size=2560, intermediate_size=6912, num_hidden_layers=40,
                          num_attention_heads=20, num_key_value_heads=20, rope_theta=5_000_000.0),
    "qwen1.5-7b": _qwen15(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32),
    "qwen1.5-14b": _qwen15(vocab_size=152064, hidden_size=5120, intermediate_size=13696, num_hidden_layers=40,
                           num_attention_heads=40, num_key_value_heads=40),
    "qwen1.5-32b": _qwen15(vocab_size=152064, hidden_size=5120, intermediate_size=27392, num_hidden_layers=64,
                           num_attention_heads=40, num_key_value_heads=8),
    "qwen1.5-72b": _qwen15(vocab_size=152064, hidden_size=8192, intermediate_size=24576, num_hidden_layers=80,
                           num_attention_heads=64, num_key_value_heads=64),
    "qwen1.5-110b": _qwen15(vocab_size=152064, hidden_size=8192, intermediate_size=49152, num_hidden_layers=80,
                            num_attention_heads=64, num_key_value_heads=8),
    "qwen1.5-moe-a2.7b": _qwen15(model_type="qwen2_moe", hidden_size=2048, intermediate_size=5632,
                                 num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                                 num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                                 shared_expert_intermediate_size=5632),
}


def get_preset(name: str) -> ModelConfig:
    key = name.lower()
    if key.startswith("qwen/"):
        key = key[len("qwen/"):]
    key = key.removesuffix("-chat")
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: expected one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[key])
