"""`python -m memformer_hf.cli ...` runs the `memformer-hf` command line (as `python -m memformer_hf` does)."""

import sys

from . import main

sys.exit(main())
