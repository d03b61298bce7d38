"""Prefetch batches onto the devices in a background thread.

Each item is ``(data_state, device_batch)`` where ``data_state`` is the grain
iterator state *after* that batch, so a checkpoint taken after consuming the
batch resumes exactly at the next one, however far the thread has run ahead.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

_END = object()


class Prefetcher:
    def __init__(self, iterator: Iterator, put: Callable[[Any], Any], size: int = 2):
        self._it = iterator
        self._put = put
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tl_jax-prefetch")
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = next(self._it)
                item = (self._it.get_state(), self._put(batch))
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
        state, batch = self._queue.get()
        if state is _END:
            raise batch
        return state, batch

    def close(self) -> None:
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5)
