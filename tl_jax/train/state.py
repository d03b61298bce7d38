"""The train state: everything a step reads and writes, as one pytree."""
from __future__ import annotations

from typing import Any

import jax
from flax import struct

PyTree = Any


@struct.dataclass
class TrainState:
    """``step`` (int32 scalar), ``params``, ``batch_stats`` ({} for models without
    BatchNorm), ``opt_state`` (an ``optax.partition`` state: frozen groups hold
    none), ``rng`` (a base key; step ``t`` uses ``fold_in(rng, t)``, so the
    random stream depends only on the step and a resumed run repeats it) and
    ``skipped`` (int32: updates skipped for non-finite loss/grads) and
    ``aux`` (constants the objective reads, e.g. a frozen teacher or the
    pretrained anchor of L2-SP: no gradient, no optimizer state). With
    ``config.train.ema_decay`` the state is its subclass
    :class:`tl_jax.train.ema.EmaTrainState` (one more field, ``ema``)."""

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    rng: jax.Array
    skipped: jax.Array
    aux: PyTree = struct.field(default_factory=dict)

    def variables(self) -> dict:
        """The flax variables dict for ``model.apply``."""
        return {"params": self.params, **({"batch_stats": self.batch_stats} if self.batch_stats else {})}
