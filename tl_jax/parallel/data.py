"""Which training examples each process reads (``config.parallel.data_sharding``).

With ``P`` processes and a global batch ``B``, every process feeds ``B / P``
rows per step (its devices' rows of the global batch):

* ``'batch'`` (default): every process builds the same *global* stream of
  examples (same shuffle, same random augmentations, keyed by the example's
  position in that stream), cut into blocks of ``B / P``; process ``p`` reads
  blocks ``p, p + P, p + 2P, ...`` (a strided slice of a lazy grain
  ``MapDataset``, so it loads and preprocesses only its own rows; cached rows
  are gathered and augmented several of its own blocks at a time,
  :meth:`tl_jax.data.shuffle.GatherBatches.strided`). Global batch
  ``k`` is then the same for any ``P``: a run on 2 hosts x 4 devices sees the
  batches of a run on 1 host x 8 devices and reaches the same params (up to
  float summation order).
* ``'examples'``: process ``p`` owns the examples ``p, p + P, ...`` of the
  (shot-restricted) split and shuffles them on its own (each process touches
  only ``1/P`` of the data, e.g. for file locality). The stream depends on
  ``P``; the number of examples must divide evenly over the processes.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import grain
import jax

MODES = ("batch", "examples")


@dataclasses.dataclass(frozen=True)
class ProcessSharding:
    """How this process's training batches are cut from the data."""

    mode: str
    process_index: int
    process_count: int

    @property
    def kwargs(self) -> dict[str, int]:
        """``process_index`` / ``process_count`` for ``train_dataset`` and ``Objective.train_dataset``."""
        if self.mode == "examples":
            return {"process_index": self.process_index, "process_count": self.process_count}
        return {"process_index": 0, "process_count": 1}

    def select(self, dataset: Any) -> Any:
        """This process's batches of the dataset built with :attr:`kwargs`."""
        if self.mode == "examples" or self.process_count == 1:
            return dataset
        if not isinstance(dataset, grain.MapDataset):
            raise ValueError(f"config.parallel.data_sharding='batch' needs a random-access grain MapDataset of "
                             f"batches, got {type(dataset).__name__}; use data_sharding='examples'")
        if hasattr(dataset, "strided"):  # GatherBatches: makes only this process's blocks, several at a time
            return dataset.strided(self.process_index, self.process_count)
        return dataset[self.process_index::self.process_count]


def process_sharding(mode: str, num_examples: int, process_index: int | None = None,
                     process_count: int | None = None) -> ProcessSharding:
    """Validate ``config.parallel.data_sharding`` against the processes and the example count."""
    if mode not in MODES:
        raise ValueError(f"config.parallel.data_sharding must be one of {MODES}, got {mode!r}")
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    if mode == "examples" and num_examples % n:
        raise ValueError(f"config.parallel.data_sharding='examples': the {num_examples} training examples do not "
                         f"split evenly over {n} processes ({num_examples % n} left over); use a process count "
                         f"that divides {num_examples}, other config.data.shots, or data_sharding='batch'")
    return ProcessSharding(mode, p, n)
