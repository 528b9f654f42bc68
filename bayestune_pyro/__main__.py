"""``python -m bayestune_pyro``: the ``bayestune`` command (e.g. ``torchrun --nproc-per-node 2 -m bayestune_pyro``)."""
import sys

from .cli import main

sys.exit(main())
