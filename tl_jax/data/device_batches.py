"""Training batches made on the devices from cached rows kept there: ``config.data.device_cache``.

When the training rows are cached (``config.data.cache``: the output of
``train_pp``'s deterministic prefix, stacked in memory and read by
:class:`~tl_jax.data.shuffle.GatherBatches`), the table can live on the
devices instead. Per step the host then sends only a *recipe* of batch ``k``,

    recipe_k = {"rows": int32 [B], "d<i>_<j>": draw j of suffix op i, [B]},

the same row indices and the same draws (keyed by stream position,
:class:`~tl_jax.data.stream_rng.StreamRng`) the host path uses, and the
compiled step builds the batch itself before the model sees it:

    batch_k = suffix_jnp(table[rows_k], draws_k)   (in the step; :func:`make_batch`)

So the batches are the host path's, value for value (tested op by op and batch
by batch), the iterator state is the same ``{"next_index": k}`` (exact resume),
and the host's share of a step shrinks to a few index lookups: no gather, crop
or normalisation of pixels on the host and no pixel transfer. The batch is
materialised before the model (an optimisation barrier): fused into a first
layer such as the CNN's im2col conv, the crop would be recomputed per use.

On CPU devices it takes batch making off the host without making the loop
faster (the host was not the bottleneck), so it is off by default
(``false``). It is for machines where the host is the bottleneck: small
models on accelerators, whose host cores also feed the transfers.

Eligible (``'auto'``): a :class:`GatherBatches` dataset (cached rows, no
objective-specific wrapping), the ``jit`` strategy in one process, every suffix
op in :data:`DEVICE_OPS` (not ``resize`` or ``to_gray``) and a table of at most
``config.data.device_cache_max_mb``. ``true`` raises with the reason when the
run is not eligible.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tl_jax.data import image_ops
from tl_jax.data.preprocess import Preprocess
from tl_jax.data.shuffle import GatherBatches
from tl_jax.data.stream_rng import StreamRng

log = logging.getLogger("tl_jax")
ROWS = "rows"


def _random_crop(x: jax.Array, top: jax.Array, left: jax.Array, *, size: tuple[int, int], pad: int) -> jax.Array:
    """``out_b = zero_pad(x_b, pad)[top_b : top_b + h, left_b : left_b + w]`` (offsets in range: drawn so)."""
    h, w = size
    if pad:
        x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    c = x.shape[-1]
    return jax.vmap(lambda img, t, l: jax.lax.dynamic_slice(img, (t, l, 0), (h, w, c)))(x, top, left)


# tl_jax.data.image_ops' own functions (they take jax arrays too), and random_crop's gather as slices.
DEVICE_OPS: dict[str, Callable[..., jax.Array]] = {
    **{name: getattr(image_ops, name) for name in ("rescale", "pad", "normalize", "center_crop", "flip_lr",
                                                    "to_rgb")},
    "random_crop": _random_crop,
}  # not here (the host makes such batches): resize (PIL), to_gray (a mean: a quotient in XLA)


def apply_ops(images: jax.Array, ops: tuple, draws: dict[str, jax.Array]) -> jax.Array:
    """``ops`` (a suffix's) over ``images`` ``[B, H, W, C]`` in jnp; op ``i``'s draws are ``draws['d<i>_<j>']``."""
    for i, op in enumerate(ops):
        args = [draws[f"d{i}_{j}"] for j in range(sum(k.startswith(f"d{i}_") for k in draws))]
        images = DEVICE_OPS[op.name](images, *args, **op.params)
    return images.astype(jnp.float32)


def make_batch(table: dict[str, jax.Array], recipe: dict[str, jax.Array], ops: tuple) -> dict[str, jax.Array]:
    """``{key: table[key][rows]}``, then the suffix ``ops`` over ``image`` with the recipe's draws (jit-able)."""
    rows = recipe[ROWS]
    out = {k: v.at[rows].get(mode="promise_in_bounds") for k, v in table.items()}
    if ops:
        out["image"] = apply_ops(out["image"], ops, {k: v for k, v in recipe.items() if k != ROWS})
    # Materialised before the model: fused into its first layer (e.g. an im2col conv) the crop and
    # normalisation would be recomputed per use.
    return jax.lax.optimization_barrier(out)


class RecipeBatches(GatherBatches):
    """:class:`GatherBatches` whose batch ``k`` is its recipe (rows and draws) instead of its pixels.

    Same order, positions, draws and iterator state as the parent class; the
    pixels come from :func:`make_batch` on the devices.
    """

    def __init__(self, arrays: dict[str, np.ndarray], *, batch_size: int, seed: int,
                 suffix: Preprocess | None = None, chunk: int | None = None, start: int = 0, step: int = 1):
        super().__init__(arrays, batch_size=batch_size, seed=seed, suffix=suffix, chunk=chunk, start=start,
                         step=step)
        ops = self._suffix.ops if self._suffix is not None else ()
        bad = [op.name for op in ops if op.name not in DEVICE_OPS]
        if bad:
            raise ValueError(f"ops {bad} have no device implementation (tl_jax.data.device_batches.DEVICE_OPS)")
        self.ops = ops
        self._in_sizes = _op_input_sizes(ops, arrays["image"].shape[1:] if ops else None, seed)

    def rows(self, positions: np.ndarray) -> dict:
        recipe = {ROWS: self.row_indices(positions).astype(np.int32)}
        rng = StreamRng(self._seed, positions) if self._suffix is not None and self._suffix.is_random else None
        for i, op in enumerate(self.ops):
            if op.random:  # in list order, as Preprocess.on_batch draws them
                sizes = np.broadcast_to(np.asarray(self._in_sizes[i]), (len(positions), 2))
                for j, d in enumerate(op.draw(rng, sizes, **op.params)):
                    recipe[f"d{i}_{j}"] = _device_dtype(np.asarray(d), op.name)
        return recipe


def _device_dtype(d: np.ndarray, name: str) -> np.ndarray:
    if d.dtype == np.bool_:
        return d
    if np.issubdtype(d.dtype, np.integer) and (d.size == 0 or np.abs(d).max() < 2**31):
        return d.astype(np.int32)
    raise ValueError(f"op {name!r} draws {d.dtype} values, which the device path does not carry exactly")


def _op_input_sizes(ops: tuple, image_shape: tuple | None, seed: int) -> list[tuple[int, int]]:
    """``(H, W)`` of the images entering each op (shapes only: :func:`jax.eval_shape` with one example)."""
    sizes, shape = [], image_shape
    rng = StreamRng(seed, np.zeros(1, np.int64))
    for op in ops:
        sizes.append(tuple(shape[:2]))
        draws = op.draw(rng, np.asarray([shape[:2]]), **op.params) if op.random else ()
        draws = [_device_dtype(np.asarray(d), op.name) for d in draws]
        shape = jax.eval_shape(lambda x, *d, op=op: DEVICE_OPS[op.name](x, *d, **op.params),
                               jax.ShapeDtypeStruct((1, *shape), jnp.float32), *draws).shape[1:]
    return sizes


@dataclasses.dataclass
class DeviceBatches:
    """The loop's side of the device path: the recipe dataset, the table on the devices, and the step wrapper."""

    recipes: RecipeBatches
    table: dict[str, jax.Array]

    def wrap(self, step_fn: Callable) -> Callable:
        """``(state, {'recipe', 'table'}) -> step_fn(state, make_batch(...))``: the pure step, batch made inside."""
        ops = self.recipes.ops

        def step(state, batch, *args):
            return step_fn(state, make_batch(batch["table"], batch["recipe"], ops), *args)

        return step

    def put(self, put_recipe: Callable) -> Callable:
        """The loop's batch placement: the recipe as ``put_recipe`` places a batch, the table as it is."""
        return lambda recipe: {"recipe": put_recipe(recipe), "table": self.table}


def ineligible_reason(dataset: Any, strategy: Any, max_bytes: int) -> str | None:
    """Why ``dataset`` cannot be made on the devices under ``strategy``, or ``None``."""
    if type(dataset) is not GatherBatches:
        return (f"the training data is not a cached row table (it is {type(dataset).__name__}: data.cache off or "
                "not fitting, a preprocess op before the first random op that is not cached, or an objective's own "
                "dataset)")
    if strategy.name != "jit":
        return f"config.parallel.mode={strategy.name!r} (the device path needs 'jit')"
    if jax.process_count() > 1:
        return "several processes (each holds its own rows)"
    ops = dataset._suffix.ops if dataset._suffix is not None else ()  # noqa: SLF001
    bad = [op.name for op in ops if op.name not in DEVICE_OPS]
    if bad:
        return f"train_pp ops {bad} after the first random op have no device implementation"
    nbytes = sum(v.nbytes for v in dataset._arrays.values())  # noqa: SLF001
    if nbytes > max_bytes:
        return f"the row table ({nbytes / 2**20:.1f} MiB) exceeds config.data.device_cache_max_mb"
    return None


def maybe_enable(mode: Any, dataset: Any, strategy: Any, max_mb: float) -> DeviceBatches | None:
    """``config.data.device_cache`` (``'auto'`` | ``True`` | ``False``) for the loop's ``dataset``."""
    if mode is False:
        return None
    reason = ineligible_reason(dataset, strategy, int(max_mb * 2**20))
    if reason is not None:
        if mode is True:
            raise ValueError(f"config.data.device_cache=true but the run cannot make its batches on the devices: "
                             f"{reason}")
        log.info("config.data.device_cache: off (%s)", reason)
        return None
    d = dataset
    recipes = RecipeBatches(d._arrays, batch_size=d._batch, seed=d._seed, suffix=d._suffix,  # noqa: SLF001
                            chunk=d._chunk, start=d._start, step=d._step)  # noqa: SLF001
    host = {k: (v.astype(np.int32) if k == "label" else v) for k, v in d._arrays.items()}  # noqa: SLF001
    table = jax.device_put(host, strategy.replicated)
    log.info("config.data.device_cache: batches made on the devices from %d cached rows (%.1f MiB); the host "
             "sends row indices and draws", len(next(iter(host.values()))),
             sum(v.nbytes for v in host.values()) / 2**20)
    return DeviceBatches(recipes, table)
