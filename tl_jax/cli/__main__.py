"""``python -m tl_jax.cli``: the ``tl-jax`` command."""
import sys

from tl_jax.cli import main

sys.exit(main())
