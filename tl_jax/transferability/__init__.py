"""Which source model (and layer) to transfer from: transferability scores, ranking, few-shot probes.

Scores (pure numpy functions of features/probabilities and labels; higher = better):

* :func:`logme` (You et al. 2021): log evidence of a Bayesian linear model on the features;
* :func:`leep` (Nguyen et al. 2020): log expected empirical prediction of the source's softmax;
* :func:`nce` (Tran et al. 2019): −H(Y | Z) of target labels given the source's argmax labels;
* :func:`h_score` (Bao et al. 2019; ``shrinkage='auto'``: Ibrahim et al. 2022);
* :func:`transrate` (Huang et al. 2022): coding rate of features minus that given the labels.

:data:`SCORES` maps the names ``tl-jax rank --score`` takes to ``(input, fn)``, where
``input`` is what the score reads of a candidate: ``'features'`` (the chosen layer),
``'probs'`` (softmax of its logits) or ``'argmax'`` (its predicted source labels).
:func:`rank` (``tl_jax.transferability.ranking``) extracts them for a target dataset and
ranks candidates; :mod:`tl_jax.evaluation.fewshot_ridge` is a closed-form ridge few-shot
evaluator of frozen features.
"""
from __future__ import annotations

import functools

from tl_jax.transferability.hscore import h_score, ledoit_wolf_shrinkage
from tl_jax.transferability.leep import leep
from tl_jax.transferability.logme import logme
from tl_jax.transferability.nce import nce
from tl_jax.transferability.transrate import transrate

SCORES = {
    "logme": ("features", logme),
    "leep": ("probs", leep),
    "nce": ("argmax", nce),
    "hscore": ("features", h_score),
    "hscore_lw": ("features", functools.partial(h_score, shrinkage="auto")),
    "transrate": ("features", transrate),
}
DEFAULT_SCORES = ("logme", "leep", "nce", "hscore", "hscore_lw", "transrate")


def rank(*args, **kwargs):
    """:func:`tl_jax.transferability.ranking.rank` (imported on first use: it needs JAX and the data code)."""
    from tl_jax.transferability.ranking import rank as _rank  # deferred: JAX + data code (and ranking imports SCORES from here)

    return _rank(*args, **kwargs)


__all__ = ["DEFAULT_SCORES", "SCORES", "h_score", "ledoit_wolf_shrinkage", "leep", "logme", "nce", "rank",
           "transrate"]
