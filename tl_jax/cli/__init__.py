"""The ``tl-jax`` command line: one module per subcommand; :func:`main` dispatches (:mod:`tl_jax.cli.main`).

    tl_jax/cli/main.py          the dispatcher, `tl-jax --help` (no JAX import), run_command (one-line errors)
    tl_jax/cli/args.py          shared: split_overrides, resolve_config, USER_ERRORS
    tl_jax/cli/train.py         tl-jax train (also python -m tl_jax.train)
    tl_jax/cli/sweep.py         tl-jax sweep           tl_jax/cli/report.py       tl-jax report
    tl_jax/cli/search.py        tl-jax search          tl_jax/cli/interpolate.py  tl-jax interpolate
    tl_jax/cli/eval_predict.py  tl-jax eval, predict   tl_jax/cli/rank_fewshot.py tl-jax rank, fewshot
    tl_jax/cli/data.py          tl-jax data prepare    tl_jax/cli/weights.py      tl-jax weights convert|inspect

Nothing outside tl_jax/cli imports it but the ``python -m tl_jax`` / ``python -m tl_jax.train`` entry points.
"""
from tl_jax.cli.args import USER_ERRORS, resolve_config, split_overrides
from tl_jax.cli.main import COMMANDS, help_text, main, run_command

__all__ = ["COMMANDS", "USER_ERRORS", "help_text", "main", "resolve_config", "run_command", "split_overrides"]
