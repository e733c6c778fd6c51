"""A paged KV cache: fixed-size blocks in one preallocated pool, a block table per sequence, prefix caching.

BlockManager does the book-keeping (no tensors): free list, refcounts, and a map from a block's content
hash to the block holding it. A full block's hash chains the previous block's hash with its token ids, so
equal hashes mean equal prefixes. A block whose refcount drops to 0 keeps its content and stays findable
by hash until the pool needs it back (least recently freed first).

PagedKVCache holds the tensors and implements the model's cache protocol for one batched step: the
engine says which pool slots each row's new tokens go to and which slots each row reads (its block table
laid out position by position); `update` writes the new keys/values and gathers a padded [B, KV, S, D] view.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from ..config import ModelConfig


class OutOfBlocks(Exception):
    """The pool has no free or evictable block left."""


def block_hashes(tokens: list[int], block_size: int, salt=None) -> list[int]:
    """The chained hash of every full block of tokens (a partial last block has none). salt starts the chain:
    keys computed under a LoRA adapter differ from the base's, so their blocks must not be shared."""
    hashes, prev = [], salt
    for start in range(0, len(tokens) - block_size + 1, block_size):
        prev = hash((prev, tuple(tokens[start:start + block_size])))
        hashes.append(prev)
    return hashes


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.refcount = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # never used, or freed without a hash
        self.evictable: OrderedDict[int, None] = OrderedDict()  # refcount 0 but still cached, oldest first
        self.cached: dict[int, int] = {}  # content hash -> block id
        self.hits = 0  # blocks reused from the prefix cache (for metrics)

    @property
    def used(self) -> int:
        return self.num_blocks - len(self.free) - len(self.evictable)

    @property
    def available(self) -> int:
        return len(self.free) + len(self.evictable)

    def allocate(self) -> int:
        if self.free:
            block = self.free.pop()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)  # least recently freed
            del self.cached[self.block_hash[block]]
            self.block_hash[block] = None
        else:
            raise OutOfBlocks("no free KV block")
        self.refcount[block] = 1
        return block

    def match_prefix(self, hashes: list[int]) -> list[int]:
        """Take a reference on the cached blocks holding the longest run of these leading block hashes."""
        blocks = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            if self.refcount[block] == 0:
                del self.evictable[block]
            self.refcount[block] += 1
            blocks.append(block)
        self.hits += len(blocks)
        return blocks

    def register(self, block: int, content_hash: int) -> None:
        """A block just became full: make it findable by its hash (unless another block already is)."""
        if self.block_hash[block] is None and content_hash not in self.cached:
            self.block_hash[block] = content_hash
            self.cached[content_hash] = block

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            self.refcount[block] -= 1
            assert self.refcount[block] >= 0, f"block {block} released more often than taken"
            if self.refcount[block] == 0:
                if self.block_hash[block] is not None:
                    self.evictable[block] = None
                else:
                    self.free.append(block)


class PagedKVCache:
    """Keys and values of every layer in one pool: [layers, num_blocks * block_size, kv_heads, head_dim]."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        slots = num_blocks * block_size
        shape = (config.num_hidden_layers, slots, config.num_key_value_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.blocks = BlockManager(num_blocks, block_size)
        self.block_size = block_size
        self._write_slots: Tensor | None = None  # [N] pool slot of each real (non-padding) new token
        self._write_index: Tensor | None = None  # [N] its flat index into the [B * T] new tokens
        self._read_slots: Tensor | None = None  # [B, S] pool slot of each key position a row reads

    def slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Pool slots of positions start .. end-1 of a sequence with this block table."""
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def table_slots(self, block_table: list[int]) -> Tensor:
        """Pool slots of every position a block table covers, in order: long [len(block_table) * block_size]."""
        blocks = torch.tensor(block_table, dtype=torch.long)
        return (blocks[:, None] * self.block_size + torch.arange(self.block_size)).flatten()

    def plan_step(self, write_slots: Tensor, write_index: Tensor, read_slots: Tensor) -> None:
        """Set where this step's forward writes its new keys/values and what each row reads."""
        self._write_slots, self._write_index, self._read_slots = write_slots, write_index, read_slots

    def update(self, layer: int, k: Tensor, v: Tensor, start_pos) -> tuple[Tensor, Tensor]:
        # k, v: [B, KV, T, D]; start_pos is unused (each row's positions were planned in plan_step).
        B, KV, T, D = k.shape
        flat_k = k.transpose(1, 2).reshape(B * T, KV, D)
        flat_v = v.transpose(1, 2).reshape(B * T, KV, D)
        self.k[layer].index_copy_(0, self._write_slots, flat_k.index_select(0, self._write_index))
        self.v[layer].index_copy_(0, self._write_slots, flat_v.index_select(0, self._write_index))
        keys = self.k[layer][self._read_slots]  # [B, S, KV, D]
        values = self.v[layer][self._read_slots]
        return keys.transpose(1, 2), values.transpose(1, 2)
