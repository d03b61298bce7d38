"""Joint objective: one CNN on mnist5k + optdigits (domains) × digit + parity (tasks), a λ matrix.

Domain 0 is mnist5k (28x28, config.data); domain 1 is UCI optdigits (8x8, 0..16)
mapped onto MNIST's frame (resize to 20x20, pad to 28x28, MNIST normalisation), as in
``experiments/multidomain_digits.py``. Two heads (``head/digit``, ``head/parity``),
every train batch of 64 half mnist5k and half optdigits, the loss
``L = Σ_d Σ_i λ_{d,i} · mean_{b∈d} CE_i(b)`` (``normalization='domain_mean'``), 200 steps,
Adam 1e-3. λ matrices (rows mnist5k, optdigits; columns digit, parity):

* ``all1``: [[1, 1], [1, 1]];
* ``parity_optdigits``: [[1, 0], [1, 1]] (parity is learnt only from optdigits);
* ``digit2_optdigits``: [[1, 1], [2, 1]] (optdigits' digit task counts double).

Run (3 seeds each, 9 runs)::

    .venv/bin/python -m tl_jax.cli sweep --config experiments/joint_digits.py --workdir runs/joint

Reported: test accuracy of every (domain, task) pair evaluated (a pair with λ = 0 is
not evaluated: ``–``) and ``test/accuracy``, the macro mean over the pairs with
λ > 0 (so ``parity_optdigits``' mean is over 3 pairs, the others' over 4). The
settings (steps, learning rate, batch) are the multidomain experiment's, not tuned
on the test splits; there is no validation split here, so the numbers are for
comparing λ matrices, not a tuned result.

Printed by the sweep (mean ± std over seeds 0, 1, 2; run 2026-12-06 on 2 shared CPU
cores, the 9 runs took 11 min)::

    | lam | test/accuracy |
    |---|---:|
    | all1 | 0.977 ± 0.002 (n=3) |
    | parity_optdigits | 0.970 ± 0.003 (n=3) |
    | digit2_optdigits | **0.978 ± 0.001 (n=3)** |

Per pair, from the runs' ``summary.json`` (mean ± sample std over the 3 seeds)::

    | λ matrix         | mnist5k digit | mnist5k parity | optdigits digit | optdigits parity | macro         |
    |------------------|--------------:|---------------:|----------------:|-----------------:|--------------:|
    | all1             | 0.965 ± 0.001 | 0.980 ± 0.002  | 0.979 ± 0.007   | 0.984 ± 0.008    | 0.977 ± 0.003 |
    | parity_optdigits | 0.965 ± 0.001 | –              | 0.981 ± 0.006   | 0.966 ± 0.015    | 0.970 ± 0.003 |
    | digit2_optdigits | 0.964 ± 0.002 | 0.980 ± 0.004  | 0.988 ± 0.005   | 0.981 ± 0.001    | 0.978 ± 0.001 |

Dropping mnist5k's parity labels costs 1.8 points of optdigits parity (0.984 -> 0.966,
a 450-image test set, std up to 0.015); doubling optdigits' digit weight gains 0.9
points of optdigits digit at 0.1 points of mnist5k digit. Three seeds: indicative only.
The ``macro`` column is not comparable across rows with different numbers of pairs.
"""
from __future__ import annotations

from tl_jax import config as config_lib
from tl_jax.sweep import product, seeds

MNIST_NORM = {"op": "normalize", "mean": 0.1307, "std": 0.3081}
MNIST_PP = [{"op": "rescale", "in_max": 255.0}, MNIST_NORM]
DIGITS_PP = [{"op": "rescale", "in_max": 16.0}, {"op": "resize", "size": 20}, {"op": "pad", "size": 28}, MNIST_NORM]
LAMBDAS = {
    "all1": [[1.0, 1.0], [1.0, 1.0]],
    "parity_optdigits": [[1.0, 0.0], [1.0, 1.0]],
    "digit2_optdigits": [[1.0, 1.0], [2.0, 1.0]],
}


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(arg, lam="all1", seed=0, steps=200)
    if a.lam not in LAMBDAS:
        raise config_lib.ConfigError(f"lam={a.lam!r}: known λ matrices {sorted(LAMBDAS)}")
    c = config_lib.base_config()
    c.seed = a.seed
    c.model.name = "cnn"
    c.model.num_classes = 10
    c.data.name = "mnist5k"
    c.data.train_pp, c.data.eval_pp = MNIST_PP, list(MNIST_PP)
    c.data.batch_size = 64
    c.data.eval_batch_size = 250
    c.optimizer.learning_rate = 1e-3
    c.train.steps = a.steps
    c.train.log_every = 50
    c.train.checkpoint_every = a.steps
    c.train.progress = False
    c.objective.name = "joint"
    j = c.objective.joint
    j.domains = [{"name": "optdigits", "train_pp": DIGITS_PP, "eval_pp": DIGITS_PP}]
    j.tasks = ["digit", "parity"]
    j.weights = LAMBDAS[a.lam]
    j.proportions = [0.5, 0.5]
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    """λ matrix × seed (``lams`` separated by ';')."""
    a = config_lib.parse_arg(arg, lams=";".join(LAMBDAS), seeds=3, steps=200)
    fixed = {} if a.steps == 200 else {"steps": a.steps}
    return product(product(fixed, lam=a.lams.split(";")), seeds(a.seeds))
