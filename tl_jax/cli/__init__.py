"""The ``tl-jax`` command line: one module per subcommand; :func:`main` dispatches."""
from tl_jax.cli.main import COMMANDS, USER_ERRORS, cmd_train, main, resolve_config, run_command, split_overrides

__all__ = ["COMMANDS", "USER_ERRORS", "cmd_train", "main", "resolve_config", "run_command", "split_overrides"]
