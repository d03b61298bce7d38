"""Linear evaluation of frozen features: multinomial logistic regression, L2 picked on a validation carve-out.

The protocol (scenic's linear evaluator, the "linear probe" of the SSL papers):

1. features standardised with the mean and std of the fitting set (per dimension;
   a constant dimension is left at 0);
2. from the train split a stratified ``val_fraction`` (seeded:
   :func:`tl_jax.data.validation.carve_validation`) is held out; for every L2
   value λ of the grid a multinomial logistic regression is fitted on the rest
   by minimising

       (1/n) Σ_i CE(W x_i + b, y_i) + (λ/2) ‖W‖²          (b not regularised)

   and the λ with the best held-out accuracy is kept (the first of equals: the
   grid goes from strong to weak L2, so the stronger one wins ties);
3. refitted on ALL train examples with that λ; the accuracy on the test split is
   the result (the test split chooses nothing).

The solver is scikit-learn's ``LogisticRegression`` (L-BFGS, multinomial), with
``C = 1 / (λ n)``: its objective ``C Σ CE + ½‖W‖²`` is the one above times
``C n``, so the same minimiser. Why scikit-learn rather than L-BFGS in
JAX: it is already a dependency, it IS the reference the accuracy is compared
with, the fit runs on host features (nothing to keep on an accelerator), and a
jitted solver would compile once per evaluator shape for a fit of seconds.
"""
from __future__ import annotations

import warnings

import numpy as np

from tl_jax.data.validation import carve_validation

L2_GRID = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)  # strong to weak
MAX_ITER = 1000


def standardise(fit_x: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """``[fit_x, *others]`` minus ``fit_x``'s per-dimension mean, over its std (std 0 -> 1), float64."""
    fit_x = np.asarray(fit_x, np.float64)
    mean, std = fit_x.mean(0), fit_x.std(0)
    std = np.where(std > 0, std, 1.0)
    return [(np.asarray(x, np.float64) - mean) / std for x in (fit_x, *others)]


def fit_logreg(x: np.ndarray, y: np.ndarray, l2: float, max_iter: int = MAX_ITER):
    """A fitted scikit-learn ``LogisticRegression`` minimising mean CE + (l2/2)‖W‖² on ``(x, y)``."""
    from sklearn.exceptions import ConvergenceWarning  # deferred: scikit-learn loads in ~1 s
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=1.0 / (float(l2) * len(x)), max_iter=int(max_iter))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter reached: the fit is still used
        return clf.fit(x, y)


def linear_eval(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                l2s=L2_GRID, val_fraction: float = 0.2, seed: int = 0, max_iter: int = MAX_ITER,
                name: str = "train split") -> dict:
    """``{'accuracy', 'l2', 'val_accuracy': {l2: acc}}`` of the protocol of the module doc."""
    train_y, test_y = np.asarray(train_y).astype(np.int64), np.asarray(test_y).astype(np.int64)
    if len(np.unique(train_y)) < 2:
        raise ValueError(f"linear evaluation: {name} has {len(np.unique(train_y))} class; needs at least 2")
    fit_idx, val_idx = carve_validation(train_y, val_fraction, seed, name=name)
    xf, xv = standardise(train_x[fit_idx], train_x[val_idx])
    val_acc = {}
    for l2 in l2s:
        val_acc[float(l2)] = float(np.mean(fit_logreg(xf, train_y[fit_idx], l2, max_iter).predict(xv)
                                           == train_y[val_idx]))
    best = max(val_acc, key=lambda v: (val_acc[v], v))
    xa, xt = standardise(train_x, test_x)
    clf = fit_logreg(xa, train_y, best, max_iter)
    return {"accuracy": float(np.mean(clf.predict(xt) == test_y)), "l2": best, "val_accuracy": val_acc}
