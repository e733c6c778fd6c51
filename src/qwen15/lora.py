"""LoRA adapters on qwen15's linear layers, in PEFT's layout and file format (SPEC §8).

y = base(x) + scale * B(A(dropout(x))), A [r, in] (PEFT's Kaiming-uniform init), B [out, r] (zeros),
scale = alpha / r (alpha / sqrt(r) with rsLoRA). A and B are float32 whatever the base's dtype (bf16
steps would round small updates away), and the base may be an nn.Linear or a block-quantized QuantLinear
(a GGUF base runs unmerged: the compact matmul plus a small float one).

Module names follow PEFT's in-memory model (`q_proj.base_layer`, `q_proj.lora_A.<adapter>`,
`q_proj.lora_B.<adapter>`), so a state-dict key maps to the saved key by dropping the adapter name and
prefixing `base_model.model.`. One LoraLinear can hold several named adapters (serving: one per model
name); `active` picks one for every row, or one per row of the batch.

Compact (quantized) weights fuse q/k/v into `qkv_proj` and gate/up into `gate_up_proj` (quant/modules.py).
An adapter on the parts then becomes one LoRA on the fused matrix: A stacks the parts' A's and B is block
diagonal (zeros where a part has no adapter), each part's scale folded into its block. That is exact and
keeps the one fused kernel call; it is for inference (loading), not for training.

Nothing here imports engine/ or train/: both build on this module.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from .errors import Qwen15Error
from .quant.modules import FUSED, QuantLinear, _BlockWeight

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
DEFAULT = "default"  # PEFT's name for the adapter a model gets first

# --target accepts the short names the issue uses as well as the module names.
SHORT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
               "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
ALL_TARGETS = tuple(SHORT_NAMES.values())


class AdapterError(Qwen15Error, ValueError):
    """A LoRA adapter (directory, config or tensors) that cannot be used with this model."""


def target_names(targets: str | Iterable[str]) -> list[str]:
    """'q,k,v' or ['q_proj', 'up'] -> module names ['q_proj', 'k_proj', 'v_proj'] (order kept, no repeats)."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    out: list[str] = []
    for t in (s.strip() for s in items):
        name = SHORT_NAMES.get(t, t)
        if name not in ALL_TARGETS:
            raise AdapterError(f"unknown LoRA target {t!r}: expected some of q,k,v,o,gate,up,down "
                               f"(or {','.join(ALL_TARGETS)})")
        if name not in out:
            out.append(name)
    if not out:
        raise AdapterError("no LoRA targets given: expected some of q,k,v,o,gate,up,down")
    return out


def lora_scale(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _out_in(base: nn.Module) -> tuple[int, int]:
    if isinstance(base, (nn.Linear, QuantLinear)):
        return base.out_features, base.in_features
    raise TypeError(f"LoRA wraps nn.Linear or QuantLinear, not {type(base).__name__}")


def _device(base: nn.Module) -> torch.device:
    for t in (*base.parameters(), *base.buffers()):
        return t.device
    return torch.device("cpu")


def dense_weight(base: nn.Module) -> Tensor:
    """The base matrix [out, in] as a float32 tensor (a quantized one dequantized)."""
    if isinstance(base, _BlockWeight):
        from .quant.native import dequantize_any

        return dequantize_any(base.weight_data)
    return base.weight.detach().float()


class LoraLinear(nn.Module):
    """A linear layer (base_layer) plus named LoRA adapters; see the module docstring."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.out_features, self.in_features = _out_in(base)
        self.base_layer = base
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.fused: dict[str, bool] = {}  # adapters held block-diagonally on a fused matrix (inference only)
        self.enabled = True  # False: the base alone (DPO's reference); see disabled()
        # None: no adapter; a name: that adapter on every row; a list: one name (or None) per batch row.
        self.active: str | Sequence[str | None] | None = None

    @property
    def weight(self) -> Tensor:
        """The base's weight (code that reads `proj.weight` for its shape or dtype sees the base's)."""
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def add(self, name: str, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        """A new adapter `name` (A Kaiming-uniform as PEFT initialises it, B zero: the output is unchanged)."""
        if name in self.lora_A:
            raise AdapterError(f"adapter {name!r} is already on this layer")
        device = _device(self.base_layer)
        a = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        b = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = LoraDropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = lora_scale(r, alpha, rslora)
        self.r[name], self.lora_alpha[name], self.use_rslora[name] = r, alpha, rslora
        self.fused[name] = False

    def delta(self, name: str, x: Tensor) -> Tensor:
        """scale * B(A(dropout(x))) in float32 (scaled at rank r, before B: r columns instead of out)."""
        a = self.lora_A[name]
        return self.lora_B[name](a(self.lora_dropout[name](x.to(a.weight.dtype))) * self.scaling[name])

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        active = self.active
        if not self.enabled or active is None:
            return y
        if isinstance(active, str):  # (an adapter may leave this layer out: then the base alone)
            return y + self.delta(active, x).to(y.dtype) if active in self.lora_A else y
        # One adapter per batch row (serving several adapters in one batch): each adapter runs on its rows.
        if len(active) != x.shape[0]:
            raise ValueError(f"{len(active)} per-row adapters for a batch of {x.shape[0]} rows")
        for name in dict.fromkeys(a for a in active if a in self.lora_A):
            rows = torch.tensor([i for i, a in enumerate(active) if a == name], device=x.device)
            y = y.index_add(0, rows, self.delta(name, x.index_select(0, rows)).to(y.dtype))
        return y

    def merged_weight(self, name: str = DEFAULT) -> Tensor:
        """W + scale * B @ A in float32 [out, in] (a quantized base dequantized)."""
        w = dense_weight(self.base_layer)
        b, a = self.lora_B[name].weight.detach().float(), self.lora_A[name].weight.detach().float()
        return w + self.scaling[name] * (b.to(w.device) @ a.to(w.device))

    def merge(self, name: str = DEFAULT, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear with the adapter folded into its weight (float: dtype, else the base's float
        dtype, float32 for a quantized base)."""
        base = self.base_layer
        if dtype is None:
            dtype = base.weight.dtype if isinstance(base, nn.Linear) else torch.float32
        w = self.merged_weight(name)
        out = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device=w.device, dtype=dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if base.bias is not None:
                out.bias.copy_(base.bias.detach())
        return out

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.r[n]}, scale={self.scaling[n]:g}" for n in self.lora_A)


class _HashDropoutFn(torch.autograd.Function):
    """x * mask / (1 - p) with the mask a hash of (seed, element index) (quant/kernels.c: hash_dropout):
    backward applies the same mask to the gradient, recomputed rather than saved."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float, seed: int) -> Tensor:
        ctx.p, ctx.seed = p, seed
        return _hash_dropout(x, p, seed)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _hash_dropout(grad, ctx.p, ctx.seed), None, None


def _hash_dropout(x: Tensor, p: float, seed: int) -> Tensor:
    from .quant.native import load_library

    x = x.contiguous()
    out = torch.empty_like(x)
    threshold = min(int(round(p * 2 ** 32)), 2 ** 32 - 1)
    load_library().hash_dropout(x.data_ptr(), out.data_ptr(), x.numel(), seed, threshold, 1.0 / (1.0 - p),
                                torch.get_num_threads())
    return out


class LoraDropout(nn.Dropout):
    """nn.Dropout for a LoRA input, with its mask drawn by the C kernels where they are built (float32 on
    the CPU): a 512 x 4864 input in 7.6 ms against 31-41 ms through bernoulli_ (most of what is left is the
    fresh output's page faults), and nothing kept for backward. The seed comes from
    PyTorch's generator, so torch.manual_seed, checkpoints' RNG states and gradient checkpointing's replay
    all govern it; the masks themselves differ from nn.Dropout's (the same distribution)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        from .quant.native import load_library

        if x.device.type != "cpu" or x.dtype != torch.float32 or load_library() is None:
            return super().forward(x)
        seed = int(torch.randint(0, 2 ** 63 - 1, (1,)))
        return _HashDropoutFn.apply(x, self.p, seed)


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def _forget_native(model: nn.Module) -> None:
    # The C-layers fast path (quant/native_layers.py) reads the compact matrices directly and cannot add a
    # LoRA term; it is decided on first use, so decide again: it does not apply once a LoraLinear is there
    # (native_layers.supported wants QuantLinear modules), and the PyTorch layers run instead.
    if hasattr(model, "_native"):
        model._native = None


def _wrap(parent: nn.Module, attr: str) -> LoraLinear:
    child = getattr(parent, attr)
    if isinstance(child, LoraLinear):
        return child
    wrapped = LoraLinear(child)
    setattr(parent, attr, wrapped)
    return wrapped


def _has_fused(parent: nn.Module, target: str) -> tuple[str, tuple[str, ...]] | None:
    for parts, fused in FUSED:
        if target in parts and getattr(parent, fused, None) is not None:
            return fused, parts
    return None


def apply_lora(model: nn.Module, targets: str | Iterable[str] = ALL_TARGETS, r: int = 16, alpha: float = 32,
               dropout: float = 0.0, rslora: bool = False, name: str = DEFAULT, freeze_base: bool = True) -> list[str]:
    """Add a fresh, trainable adapter to every linear named in targets (q_proj, ... or q, k, ...).

    Returns the wrapped modules' names. With freeze_base (PEFT's get_peft_model does the same) every
    other parameter stops requiring gradients. Fused quantized matrices cannot be trained through: load
    the base dequantized (the training path does)."""
    names = target_names(targets)
    if r <= 0:
        raise AdapterError(f"LoRA rank must be a positive integer, got {r}")
    wrapped = []
    for path, module in list(model.named_modules()):
        for t in names:
            if _has_fused(module, t):
                raise AdapterError(f"{path}.{t} is part of a fused quantized matrix: LoRA training needs the "
                                   "base dequantized (load it with keep_quantized=False)")
            child = getattr(module, t, None)
            if isinstance(child, (nn.Linear, QuantLinear, LoraLinear)):
                _wrap(module, t).add(name, r, alpha, dropout, rslora)
                wrapped.append(f"{path}.{t}" if path else t)
    if not wrapped:
        raise AdapterError(f"no layer of the model matches the LoRA targets {names}")
    set_adapter(model, name)
    if freeze_base:
        for pname, p in model.named_parameters():
            p.requires_grad_(".lora_A." in pname or ".lora_B." in pname)
    _forget_native(model)
    return wrapped


def lora_parameters(model: nn.Module, name: str = DEFAULT) -> list[nn.Parameter]:
    return [p for _, m in lora_layers(model) if name in m.lora_A
            for p in (m.lora_A[name].weight, m.lora_B[name].weight)]


@contextmanager
def disabled(model: nn.Module):
    """The base model alone (every adapter switched off) within the block: DPO's reference model."""
    layers = [m for _, m in lora_layers(model)]
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(layers, before):
            m.enabled = was


def set_adapter(model: nn.Module, active: str | Sequence[str | None] | None) -> None:
    """Which adapter runs: a name (every row), None (the base), or one name/None per batch row."""
    for _, m in lora_layers(model):
        m.active = active


def adapter_names(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(n for _, m in lora_layers(model) for n in m.lora_A))


def peft_key(state_key: str, name: str = DEFAULT) -> str | None:
    """A model state-dict key of adapter `name` -> its key in adapter_model.safetensors, else None:
    `model.layers.0.self_attn.q_proj.lora_A.default.weight` -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`
    (for tensors gathered elsewhere, e.g. from FSDP shards, then written with save_adapter(state=...))."""
    for ab in ("lora_A", "lora_B"):
        suffix = f".{ab}.{name}.weight"
        if state_key.endswith(suffix):
            return f"{PEFT_PREFIX}{state_key[: -len(suffix)]}.{ab}.weight"
    return None


def peft_state_dict(model: nn.Module, name: str = DEFAULT) -> dict[str, Tensor]:
    """The adapter's tensors under PEFT's saved names (`base_model.model.<module>.lora_A.weight`), float32, CPU."""
    out = {}
    for path, m in lora_layers(model):
        if name not in m.lora_A:
            continue
        if m.fused[name]:
            raise AdapterError(f"{path}: an adapter loaded onto a fused quantized matrix cannot be saved")
        out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = m.lora_A[name].weight.detach().float().cpu().contiguous()
        out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = m.lora_B[name].weight.detach().float().cpu().contiguous()
    if not out:
        raise AdapterError(f"the model has no LoRA adapter named {name!r}")
    return out


def save_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None,
                 name: str = DEFAULT, state: dict[str, Tensor] | None = None) -> Path:
    """Write adapter_config.json and adapter_model.safetensors as PEFT's save_pretrained does.

    state: the adapter's tensors by PEFT's saved names (peft_state_dict), when they come from elsewhere
    (e.g. gathered from FSDP shards); by default read from the model. Files are written under temporary
    names and renamed, so a directory never holds a half-written adapter."""
    from safetensors.torch import save_file

    layers = [(p, m) for p, m in lora_layers(model) if name in m.lora_A]
    if not layers:
        raise AdapterError(f"the model has no LoRA adapter named {name!r}")
    tensors = state if state is not None else peft_state_dict(model, name)
    m0 = layers[0][1]
    ranks = {m.r[name] for _, m in layers}
    alphas = {m.lora_alpha[name] for _, m in layers}
    dropout = m0.lora_dropout[name].p if isinstance(m0.lora_dropout[name], nn.Dropout) else 0.0
    targets = sorted({p.rsplit(".", 1)[-1] for p, _ in layers})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": m0.r[name], "lora_alpha": m0.lora_alpha[name], "lora_dropout": dropout,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "use_dora": False, "use_rslora": m0.use_rslora[name], "init_lora_weights": True,
        "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None, "peft_version": None,
    }
    if len(ranks) > 1 or len(alphas) > 1:  # per-module values, as PEFT writes them (full-name patterns)
        config["rank_pattern"] = {p: m.r[name] for p, m in layers if m.r[name] != m0.r[name]}
        config["alpha_pattern"] = {p: m.lora_alpha[name] for p, m in layers if m.lora_alpha[name] != m0.lora_alpha[name]}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_c = directory / (WEIGHTS_FILE + ".tmp"), directory / (CONFIG_FILE + ".tmp")
    save_file(tensors, str(tmp_w), metadata={"format": "pt"})
    tmp_c.write_text(json.dumps(config, indent=2) + "\n")
    tmp_w.replace(directory / WEIGHTS_FILE)
    tmp_c.replace(directory / CONFIG_FILE)
    return directory


# ---- loading a PEFT adapter directory ---------------------------------------------------------------

def read_adapter(directory: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """adapter_config.json (checked: a plain LoRA) and the tensors of a PEFT adapter directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"LoRA adapter {directory}: no such directory (expected a PEFT adapter directory "
                           f"with {CONFIG_FILE} and {WEIGHTS_FILE})")
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.is_file():
        raise AdapterError(f"LoRA adapter {directory}: {CONFIG_FILE} is missing (expected a PEFT adapter directory)")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type is {peft_type!r}, expected 'LORA' (only LoRA adapters are supported)")
    if config.get("use_dora"):
        raise AdapterError(f"{cfg_path}: use_dora is true; DoRA adapters are not supported (expected plain LoRA)")
    if config.get("fan_in_fan_out"):
        raise AdapterError(f"{cfg_path}: fan_in_fan_out is true, expected false (Qwen2's projections are nn.Linear)")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{cfg_path}: bias is {config.get('bias')!r}; adapters that train biases are not supported "
                           "(expected 'none')")
    if config.get("modules_to_save"):
        raise AdapterError(f"{cfg_path}: modules_to_save {config['modules_to_save']} is not supported "
                           "(expected null: only LoRA matrices)")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool) or config[key] <= 0:
            raise AdapterError(f"{cfg_path}: {key} is {config.get(key)!r}, expected a positive number")
    weights = directory / WEIGHTS_FILE
    if weights.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterError(f"{weights}: not a readable safetensors file ({e})") from None
    elif (directory / "adapter_model.bin").is_file():
        raise AdapterError(f"LoRA adapter {directory}: only adapter_model.bin (pickle) is there; expected "
                           f"{WEIGHTS_FILE} (save with safe_serialization=True)")
    else:
        raise AdapterError(f"LoRA adapter {directory}: {WEIGHTS_FILE} is missing")
    return config, tensors


_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def _pattern_value(patterns: dict, module: str, default):
    # PEFT matches rank_pattern / alpha_pattern keys as regexes against the end of the module's name.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_adapter(model: nn.Module, directory: str | Path, name: str = DEFAULT, activate: bool = True) -> dict:
    """Put the PEFT adapter in directory onto the model under `name` (unmerged); returns its config.

    Works on a float model (nn.Linear: LoRA per projection) and on a quantized one (QuantLinear, fused
    q/k/v and gate/up held block-diagonally)."""
    directory = Path(directory)
    config, tensors = read_adapter(directory)
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{directory / WEIGHTS_FILE}: tensor {key!r} is not a LoRA A/B matrix (expected "
                               "keys like base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight)")
        pairs.setdefault(m["module"], {})[m["ab"]] = t
    if not pairs:
        raise AdapterError(f"{directory / WEIGHTS_FILE}: holds no LoRA tensors")
    rslora = bool(config.get("use_rslora"))
    plain: list[tuple[nn.Module, str, str, Tensor, Tensor, int, float]] = []
    fused: dict[tuple[str, str], dict[str, tuple[Tensor, Tensor, float]]] = {}
    for module_path, ab in sorted(pairs.items()):
        where = f"{directory.name}: {module_path}"
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{where}: has lora_{''.join(ab)} but not its partner (expected lora_A and lora_B)")
        a, b = ab["A"], ab["B"]
        parent_path, _, leaf = module_path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path)
        except AttributeError:
            raise AdapterError(f"{where}: the model has no module {parent_path!r} (is the adapter for another model?)") from None
        if leaf not in ALL_TARGETS:
            raise AdapterError(f"{where}: LoRA on {leaf!r} is not supported (expected the projections "
                               f"{', '.join(ALL_TARGETS)})")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{where}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not make a LoRA pair "
                               "(expected [r, in] and [out, r])")
        r = a.shape[0]
        alpha = float(_pattern_value(config.get("alpha_pattern"), module_path, config["lora_alpha"]))
        target = getattr(parent, leaf, None)
        if target is None and (f := _has_fused(parent, leaf)):
            fused_name, parts = f
            out = _part_sizes(model, parent, fused_name, parts)[leaf]
            in_features = getattr(parent, fused_name).in_features
            target_shape = (out, in_features)
            fused.setdefault((parent_path, fused_name), {})[leaf] = (a, b, lora_scale(r, alpha, rslora))
        elif isinstance(target, (nn.Linear, QuantLinear, LoraLinear)):
            target_shape = (target.out_features, target.in_features)
            plain.append((parent, leaf, module_path, a, b, r, alpha))
        else:
            raise AdapterError(f"{where}: the model has no linear layer there (is the adapter for another model?)")
        if a.shape[1] != target_shape[1] or b.shape[0] != target_shape[0]:
            raise AdapterError(f"{where}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit the model's "
                               f"[{target_shape[0]}, {target_shape[1]}] weight (expected [r, {target_shape[1]}] and "
                               f"[{target_shape[0]}, r]: is the adapter for another model?)")
    for parent, leaf, module_path, a, b, r, alpha in plain:
        layer = _wrap(parent, leaf)
        if name in layer.lora_A:
            raise AdapterError(f"adapter {name!r} is already loaded")
        layer.add(name, r, alpha, float(config.get("lora_dropout") or 0.0), rslora)
        with torch.no_grad():
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)
    for (parent_path, fused_name), parts in fused.items():
        parent = model.get_submodule(parent_path)
        _load_fused(model, parent, fused_name, parts, name)
    if activate:
        set_adapter(model, name)
    _forget_native(model)
    return config


def _part_sizes(model: nn.Module, parent: nn.Module, fused_name: str, parts: tuple[str, ...]) -> dict[str, int]:
    """Output rows of each part of a fused matrix, in order."""
    cfg = model.config
    if fused_name == "qkv_proj":
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        return dict(zip(parts, (q, kv, kv)))
    half = getattr(parent, fused_name).out_features // 2
    return dict(zip(parts, (half, half)))


def _load_fused(model: nn.Module, parent: nn.Module, fused_name: str,
                parts: dict[str, tuple[Tensor, Tensor, float]], name: str) -> None:
    """One LoRA on a fused matrix: A = the parts' A's stacked, B block diagonal with each scale folded in."""
    layer = _wrap(parent, fused_name)
    if name in layer.lora_A:
        raise AdapterError(f"adapter {name!r} is already loaded")
    all_parts = next(p for p, f in FUSED if f == fused_name)
    sizes = _part_sizes(model, parent, fused_name, all_parts)
    rank = sum(a.shape[0] for a, _, _ in parts.values())
    a_all = torch.zeros(rank, layer.in_features)
    b_all = torch.zeros(layer.out_features, rank)
    row = col = 0
    for part in all_parts:
        if part in parts:
            a, b, scale = parts[part]
            r = a.shape[0]
            a_all[col:col + r] = a.float()
            b_all[row:row + sizes[part], col:col + r] = b.float() * scale
            col += r
        row += sizes[part]
    layer.add(name, rank, float(rank))  # scale 1: the parts' scales are in B
    layer.fused[name] = True
    with torch.no_grad():
        layer.lora_A[name].weight.copy_(a_all)
        layer.lora_B[name].weight.copy_(b_all)


def merge_lora(model: nn.Module, name: str = DEFAULT, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold adapter `name` into the weights: every LoraLinear becomes a plain nn.Linear (in place)."""
    for path, layer in lora_layers(model):
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if name in layer.lora_A:
            setattr(parent, leaf, layer.merge(name, dtype))
        else:
            setattr(parent, leaf, layer.base_layer)
    _forget_native(model)
    return model
