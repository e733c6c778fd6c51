"""`python -m qwen15 ...` (and `torchrun --nproc-per-node N -m qwen15 ...`, what `qwen15 train --nproc N` runs):
the same as the `qwen15` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
