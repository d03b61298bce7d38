"""``python -m tl_jax.train --config ... --workdir ...`` = ``tl-jax train ...``."""
import sys

from tl_jax.cli.main import run_command
from tl_jax.cli.train import cmd_train

if __name__ == "__main__":
    prog = "python -m tl_jax.train"
    sys.exit(run_command(lambda argv: cmd_train(argv, prog=prog), sys.argv[1:], prog=prog))
