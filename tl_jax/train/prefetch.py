"""Batches onto the devices ahead of the step: in a background thread, or in the loop's own thread.

Each item is ``(data_state, device_batch)`` where ``data_state`` is the grain
iterator state *after* that batch, so a checkpoint taken after consuming the
batch resumes exactly at the next one, however far the thread has run ahead.

``size`` (``config.data.prefetch``) is how many device batches a background
thread keeps ready; ``0`` reads and places each batch in the caller's thread
when it asks for it. JAX dispatches the step asynchronously, so the caller
makes batch ``k + 1`` while the devices run step ``k`` either way; the thread
only helps when the caller waits (metrics, checkpoints, eval) or the pipeline
is slower than the step. On a machine of 2 cores or fewer the thread's
wake-ups and GIL hand-offs take the cores from XLA and cost the loop more
than they save, hence :func:`auto_size` (BENCHMARKS.md, goal 1).
"""
from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

_END = object()


def auto_size(setting: Any = "auto") -> int:
    """``config.data.prefetch`` as a size: ``'auto'`` is 2 on machines of more than 2 cores, else 0."""
    if setting == "auto":
        return 2 if (os.cpu_count() or 1) > 2 else 0
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ValueError(f"config.data.prefetch must be 'auto' or an int >= 0, got {setting!r}")
    return setting


class Prefetcher:
    """``next(p) -> (data_state, device_batch)`` with ``size`` batches made ahead (0: on demand)."""

    def __init__(self, iterator: Iterator, put: Callable[[Any], Any], size: int = 2):
        self._it = iterator
        self._put = put
        self._thread = None
        if size > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=size)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, daemon=True, name="tl_jax-prefetch")
            self._thread.start()

    def _item(self) -> tuple[dict, Any]:
        batch = next(self._it)
        return self._it.get_state(), self._put(batch)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._item()
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001  (re-raised in the consumer)
            self._queue.put((_END, e))

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> tuple[dict, Any]:
        if self._thread is None:
            return self._item()
        state, batch = self._queue.get()
        if state is _END:
            raise batch
        return state, batch

    def close(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5)
