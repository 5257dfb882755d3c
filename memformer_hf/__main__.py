"""`python -m memformer_hf ...` runs the `memformer-hf` command line (see `memformer_hf.cli`)."""

import sys

from .cli import main

sys.exit(main())
