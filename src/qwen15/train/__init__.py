"""`qwen15 train`: supervised fine-tuning (LoRA or full) and DPO, on one process or FSDP2 across many.

    from qwen15.train import sft, dpo
    sft(model="qwen2.5-coder-0.5b-instruct", data="train.jsonl", out="run1", max_steps=100)
"""


def sft(*args, **kwargs):
    from .sft import sft as _sft

    return _sft(*args, **kwargs)


def dpo(*args, **kwargs):
    from .dpo import dpo as _dpo

    return _dpo(*args, **kwargs)


__all__ = ["sft", "dpo"]
