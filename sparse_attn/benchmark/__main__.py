"""``python -m sparse_attn.benchmark [options]``: same as ``sparse-attn bench``."""

import sys

from . import main

sys.exit(main())
