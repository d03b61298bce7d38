"""``python -m tl_jax.train --config ... --workdir ...`` = ``tl-jax train ...``."""
import sys

from tl_jax.cli import cmd_train, run_command

if __name__ == "__main__":
    sys.exit(run_command(cmd_train, sys.argv[1:], prog="python -m tl_jax.train"))
