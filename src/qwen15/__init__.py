"""qwen15: run, serve, evaluate and fine-tune the Qwen1.5 model family in plain PyTorch."""

__version__ = "0.1.0"

__all__ = ["LLM", "ModelConfig", "SamplingParams"]


def __getattr__(name: str):
    # Lazy, so that `import qwen15` (and the CLI's --help) does not pay for importing torch.
    if name == "LLM":
        from .engine.engine import LLM

        return LLM
    if name == "SamplingParams":
        from .engine.sampling import SamplingParams

        return SamplingParams
    if name == "ModelConfig":
        from .config import ModelConfig

        return ModelConfig
    raise AttributeError(f"module 'qwen15' has no attribute {name!r}")
