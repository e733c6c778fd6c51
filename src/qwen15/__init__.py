"""qwen15: run, serve, evaluate and fine-tune the Qwen1.5 model family in plain PyTorch."""

__version__ = "0.1.0"
