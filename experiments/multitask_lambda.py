"""λ ablation for the multitask experiment: how much weight the auxiliary tasks should get.

``experiments/multitask_mnist.py`` with ``weighting='fixed'`` and
λ = (1, lam, lam) on (digit, parity, ge5): ``lam=0`` trains the digit head alone
(the auxiliary heads get no gradient), larger ``lam`` shares more of the
backbone with the two auxiliary tasks. Reported: the main task's (digit) test
accuracy; ``tl-jax report runs/multitask_lambda --metric test/accuracy/parity``
gives an auxiliary one.

The points differ only in λ (a traced number) and the seed, so ``tl-jax
sweep`` may train them as ONE vmapped step (``--vectorize auto`` times both
ways and logs which it chose)::

    tl-jax sweep --config experiments/multitask_lambda.py --workdir runs/multitask_lambda
    tl-jax sweep --config experiments/multitask_lambda.py:lams=0;1,seeds=1,steps=50 --workdir /tmp/mt --vectorize on

The table it printed is in README.md ("Ablations and sweeps").
"""
from __future__ import annotations

from tl_jax import config as config_lib
from tl_jax.sweep import product, seeds
from tl_jax.sweep.study import sibling_module

LAMS = (0.0, 0.3, 1.0, 3.0)


def _multitask_mnist():
    return sibling_module(__file__, "multitask_mnist.py")


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(arg, lam=1.0, seed=0, steps=200)
    if not a.lam >= 0:
        raise config_lib.ConfigError(f"lam={a.lam!r} must be >= 0")
    return _multitask_mnist().get_config(f"method=fixed,seed={a.seed},steps={a.steps},weights=1;{a.lam};{a.lam}")


def get_sweep(arg: str | None = None) -> list[dict]:
    """lam x seed (``lams`` separated by ';')."""
    a = config_lib.parse_arg(arg, lams=";".join(f"{x:g}" for x in LAMS), seeds=3, steps=200)
    fixed = {} if a.steps == 200 else {"steps": a.steps}
    return product(product(fixed, lam=[float(x) for x in a.lams.split(";")]), seeds(a.seeds))
