"""The Python heap during the step loop: what exists before it starts is not rescanned by the garbage collector.

By the time the loop starts, a run has imported jax, flax, optax, orbax and
tensorflow_datasets and built its model and data: ~300,000 objects tracked by
Python's cyclic garbage collector. The loop's own allocations (metric dicts,
batches, orbax's save machinery) trigger collections, and every so often a
full (generation-2) one walks all of them, for a noticeable pause with the
devices idle for lack of the next step. :func:`frozen_heap` moves every
object to the collector's permanent generation (:func:`gc.freeze`) for the
length of the loop, so full collections only walk what the loop itself
allocated. It does not collect first: at a loop start there is next to no
unreachable garbage, so a full collection would cost its pause for nothing.

Nothing changes for memory that reference counting frees (almost all of it).
A reference cycle among objects that existed before the loop and that becomes
garbage during it is collected when the loop ends (:func:`gc.unfreeze`). If
the caller had frozen objects itself, they stay frozen.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def frozen_heap() -> Iterator[int]:
    """``with frozen_heap() as n:`` the objects alive at entry (``n`` of them) are skipped by the cyclic
    garbage collector until exit; collections still run for everything allocated inside."""
    already = gc.get_freeze_count()
    gc.freeze()
    try:
        yield gc.get_freeze_count() - already
    finally:
        if not already:  # a caller's own gc.freeze() is left as it was
            gc.unfreeze()
