"""One BLAS thread for the scores' and the few-shot ridge's small numpy linear algebra.

Their matrices are at most a few hundred to a thousand rows and columns: one
thread does each product or decomposition in milliseconds, while a multi-threaded
BLAS oversubscribes the cores when they are shared (XLA's threads, other
processes). Measured on a busy 2-core machine: the whole few-shot sweep (4 shots
x 3 seeds x 21 L2 values, 1024-d features) took 6.7 s with the default threads
and 0.6 s with one.
"""
from __future__ import annotations

import contextlib


def one_blas_thread():
    """A context limiting numpy's BLAS to one thread (``threadpoolctl``, a scikit-learn dependency)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - nothing to limit with
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")
