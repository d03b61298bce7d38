"""The Python heap during the step loop: what exists before it starts is not rescanned by the garbage collector.

By the time the loop starts, a run has imported jax, flax, optax, orbax and
tensorflow_datasets and built its model and data: ~300,000 objects tracked by
Python's cyclic garbage collector. The loop's own allocations (metric dicts,
batches, orbax's save machinery) trigger collections, and every so often a
full (generation-2) one walks all of them: 153 ms on the 2-core demo, once
per ~600 steps, with the devices idle for lack of the next step (timed with
:data:`gc.callbacks` over the demo's source stage with a save every 50 steps,
2026-11-28). :func:`frozen_heap` moves
every object to the collector's permanent generation (:func:`gc.freeze`) for
the length of the loop, so full collections only walk what the loop itself
allocated (none ran in the same 600 steps). It does not collect first: at the
demo's loop start a full collection took 160 ms and found 10-33 unreachable
objects, with no change in RSS.

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
