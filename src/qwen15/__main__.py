"""`python -m qwen15` (what torchrun runs for `qwen15 train --nproc N`): the qwen15 command."""

import sys

from .cli import main

sys.exit(main())
