"""Running one model over several processes with torch.distributed.

group.py: the process group (torchrun's environment, or `--tp N` spawning the ranks on this machine), the
command channel by which rank 0 drives the others, and what happens when a rank dies.
tp.py: the tensor-parallel plan, which rows and columns of each weight a rank holds, and its all-reduces.
"""
