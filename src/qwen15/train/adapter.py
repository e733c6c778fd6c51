"""LoRA for training: y = W x + (alpha / r) B A dropout(x), A [r, in] (Kaiming-uniform), B [out, r] (zeros).

Saved in PEFT's format (SPEC 8): adapter_config.json and adapter_model.safetensors with keys
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`. Module names follow PEFT's
(`base_layer`, `lora_A`, `lora_B`) so that a state-dict key maps to the saved key by a prefix.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # The adapter trains in float32 whatever the base's dtype (bf16 steps would round away small updates).
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init
        nn.init.zeros_(self.lora_B.weight)
        self.enabled = True

    @property
    def weight(self) -> Tensor:  # code that reads `proj.weight` (shapes, dtype) sees the base's
        return self.base_layer.weight

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if not self.enabled:
            return y
        delta = self.lora_B(self.lora_A(self.dropout(x.to(torch.float32))))
        return y + (delta * self.scaling).to(y.dtype)


def apply_lora(net: nn.Module, r: int, alpha: float, dropout: float, targets: list[str]) -> list[str]:
    """Wrap every nn.Linear whose name is in targets (q_proj, ...); returns the wrapped modules' names."""
    wrapped = []
    for name, module in list(net.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        from .forward import TrainError

        raise TrainError(f"no layer matches the LoRA targets {targets} (is the model quantized?)")
    return wrapped


@contextmanager
def disabled(net: nn.Module):
    """The base model alone (the adapters' contribution switched off) within the block."""
    layers = [m for m in net.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield net
    finally:
        for m in layers:
            m.enabled = True


def save_peft(directory: Path, weights: dict[str, Tensor], r: int, alpha: float, dropout: float,
              targets: list[str], base_model: str) -> None:
    """weights: the lora_A / lora_B tensors by their names in the model (`model.layers.0.self_attn.q_proj.lora_A.weight`)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in weights.items()
               if ".lora_A." in k or ".lora_B." in k}
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": r,
              "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(targets), "bias": "none",
              "fan_in_fan_out": False, "modules_to_save": None, "use_dora": False, "use_rslora": False,
              "inference_mode": True, "init_lora_weights": True, "layers_to_transform": None}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
