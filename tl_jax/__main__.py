"""``python -m tl_jax COMMAND ...`` = ``tl-jax COMMAND ...``."""
import sys

from tl_jax.cli import main

sys.exit(main())
