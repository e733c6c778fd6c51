"""A preallocated key/value cache that stores only the kv heads (GQA shrinks it by heads / kv_heads)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import ModelConfig


class KVCache:
    """Keys and values for every layer: [layers, batch, kv_heads, max_len, head_dim] each.

    Allocated once for the longest sequence the request can reach, so decode never reallocates.
    """

    def __init__(self, config: ModelConfig, max_len: int, batch_size: int = 1,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # positions filled so far (the engine advances it after each forward)

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize

    def update(self, layer: int, k: Tensor, v: Tensor, start_pos: int | Tensor) -> tuple[Tensor, Tensor]:
        if isinstance(start_pos, Tensor):
            # Static shapes (compiled decode): write in place at tensor positions, return the whole cache;
            # the attention mask hides what is not written yet.
            positions = start_pos + torch.arange(k.shape[2], device=k.device)
            self.k[layer].index_copy_(2, positions, k)
            self.v[layer].index_copy_(2, positions, v)
            return self.k[layer], self.v[layer]
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.k[layer, :, :, start_pos:end] = k
        self.v[layer, :, :, start_pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
