"""torch.distributed for training: the process group, FSDP2 sharding, and `--nproc N` (which runs torchrun).

Launched by torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) the run joins a process group:
gloo on the CPU, NCCL on GPUs. Each decoder layer is `fully_shard`ed, then the root (torchtitan's and
torchtune's order): the root holds the embedding, final norm and head. Where the checkpoint ties the
head to the embedding, qwen15's model has one parameter for both (`lm_head` is None and the head reads
`embed_tokens.weight`), so there is no second copy to re-tie after sharding.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of a list of floats over the ranks (float64)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def setup(device: str) -> World:
    """Join the torchrun process group when launched by torchrun; otherwise one process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return World(rank, size, local)


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard(root: nn.Module, layers: nn.ModuleList) -> None:
    """FSDP2: each decoder layer its own unit, then the root (embedding, norm, head)."""
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer)
    fully_shard(root)


def full_tensor(t: Tensor) -> Tensor:
    """A sharded (DTensor) tensor gathered whole; a plain one as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def launch(nproc: int, argv: list[str]) -> int:
    """`qwen15 train ... --nproc N`: rerun the same command under torchrun with N processes on this machine."""
    from torch.distributed.run import main as torchrun

    args = [a for a in argv]
    i = args.index("--nproc") if "--nproc" in args else None
    if i is not None:
        del args[i:i + 2]
    else:
        args = [a for a in args if not a.startswith("--nproc=")]
    cmd = ["--standalone", f"--nproc-per-node={nproc}", "-m", "qwen15", *args]
    try:
        torchrun(cmd)
    except SystemExit as e:  # torchrun exits through SystemExit/ChildFailedError
        return int(e.code or 0)
    except Exception as e:
        print(f"qwen15: error: torchrun failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr)
        return 1
    return 0
