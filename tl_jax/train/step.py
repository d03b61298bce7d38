"""The pure train and eval steps: ``(state, batch) -> (state, metrics)``.

A *loss function* (an objective's ``loss``, see :mod:`tl_jax.objectives`) has
the signature::

    loss_fn(params, batch_stats, aux, batch, rng, step) -> (loss, (new_batch_stats, metrics))

and :func:`make_train_step` closes over it and an optax transformation. The
step is pure, so it runs under ``jax.jit`` (sharded over a mesh), ``jax.pmap``
(with ``axis_name`` for ``lax.pmean``) or ``jax.vmap`` alike.

Why ``train/grad_norm`` only on the logged steps: a reduction over every
gradient that XLA:CPU does not fuse into the update is a noticeable share of a
small model's step, so the step computes ``‖g‖₂`` on the steps the loop logs
(``config.train.log_every``). The finiteness check is then ``isfinite(loss)``
on every step plus ``isfinite(‖g‖)`` on those steps: a NaN/Inf gradient under
a finite loss makes the next step's loss non-finite, which stops the run there.
``nan_policy='skip'`` must know before every update, so it computes the norm
on every step. Why two programs (``grad_norm=True/False``) rather than one
``lax.cond``: a conditional costs a little even when its predicate is false,
and on GPUs XLA's conditional thunk copies its predicate to the host and
waits for it, inside every step.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from tl_jax.objectives.base import HPARAMS, Objective
from tl_jax.train import ema as ema_lib
from tl_jax.train.state import TrainState

PyTree = Any
Batch = dict[str, jax.Array]
SKIPPED = "train/skipped_steps"
LossFn = Callable[[PyTree, PyTree, PyTree, Batch, jax.Array, jax.Array], tuple[jax.Array, tuple[PyTree, dict]]]


def is_grad_norm_step(step: Any, every: int, last_step: int | None = None) -> Any:
    """Whether the step that ends at ``step`` (1-based) computes ``train/grad_norm``.

    Every ``every``-th step and ``last_step``: with ``every = config.train.log_every``
    these are exactly the steps the loop logs. Works on ints and traced arrays.
    """
    hit = step % every == 0
    return hit if last_step is None else hit | (step == last_step)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, nan_policy: str = "error",
                    axis_name: str | None = None, value_and_grad: Callable | None = None,
                    trainable: PyTree | None = None, grad_norm_every: int = 1,
                    last_step: int | None = None, grad_norm: bool | None = None,
                    accum_steps: int = 1,
                    ema_decay: float = 0.0) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Build ``train_step(state, batch) -> (state, metrics)``.

    ``value_and_grad``, ``trainable``, ``accum_steps``: how the gradients are taken (:func:`gradient_fn`).
    ``nan_policy``: ``'skip'`` keeps the old state when the loss or any gradient
    is non-finite and counts it in ``state.skipped``; ``'error'`` applies the
    update and reports ``train/finite`` = 0 so the loop can stop and name the
    step. ``axis_name``: set under ``jax.pmap`` to average grads, batch stats
    and metrics over devices with ``lax.pmean``.

    ``grad_norm_every``, ``last_step``: ``train/grad_norm = ‖g‖₂`` (over all
    gradient leaves) is computed only on the steps where
    :func:`is_grad_norm_step` holds (a ``lax.cond``; 0 on the others; the
    module docstring says why). ``grad_norm``: ``None`` (default) is that
    ``lax.cond``, one program for every step (vmapped sweeps); ``True``/``False``
    build a step that computes the norm on every step / on none (0, finiteness
    from the loss alone), with no ``lax.cond``: the loop compiles both and runs
    the first on the steps :func:`is_grad_norm_step` picks
    (``config.train.grad_norm_program``). ``grad_norm=False`` with
    ``nan_policy='skip'`` is an error.

    ``hparams`` (optional third argument; :mod:`tl_jax.sweep.vectorized` vmaps
    over it): ``{"loss": {config_key: value}}`` is passed to the loss as
    ``aux["hparams"]`` (see :func:`tl_jax.objectives.base.hparam`), and
    ``{"update_scale": tree like params}`` multiplies each param's update (a
    learning-rate factor). Without it the step is the plain one.

    ``ema_decay`` (``config.train.ema_decay``, d): a state with an ``ema`` field
    (:class:`tl_jax.train.ema.EmaTrainState`) gets ``ema ← d·ema + (1−d)·params``
    after the update (a skipped update keeps the old average).
    """
    _check_step_args(nan_policy, grad_norm_every, grad_norm, accum_steps)
    every = 1 if nan_policy == "skip" or grad_norm else grad_norm_every
    grad_fn = gradient_fn(loss_fn, value_and_grad, trainable, accum_steps)

    def train_step(state: TrainState, batch: Batch, hparams: dict | None = None) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        aux = state.aux
        if hparams and hparams.get("loss"):  # traced loss weights of a vectorised sweep, read via objectives.hparam
            aux = {**aux, HPARAMS: hparams["loss"]}
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        (loss, (batch_stats, metrics)), grads = grad_fn(state.params, state.batch_stats, aux, batch, rng, state.step)
        if axis_name is not None:
            grads, batch_stats, metrics = jax.lax.pmean((grads, batch_stats, metrics), axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        if hparams and hparams.get("update_scale") is not None:  # per-param lr factors of a vectorised sweep
            updates = jax.tree.map(lambda u, f: (u * f).astype(u.dtype), updates, hparams["update_scale"])
        params = optax.apply_updates(state.params, updates)
        norm = _grad_norm(grads, state.step + 1, grad_norm, every, last_step)
        # One reduction for both: a NaN/Inf anywhere in the grads makes their norm non-finite (as does a
        # norm that overflows float32), instead of a second pass over every gradient.
        finite = jnp.isfinite(loss) & jnp.isfinite(norm)
        if axis_name is not None:
            finite = jax.lax.pmin(finite.astype(jnp.int32), axis_name).astype(bool)
        new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        if ema_lib.has_ema(state):  # config.train.ema_decay
            new = new.replace(ema=ema_lib.update(state.ema, params, ema_decay))
        if nan_policy == "skip":
            kept = state.replace(step=state.step + 1, skipped=state.skipped + 1)
            new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, kept)
        metrics = dict(metrics)
        metrics["train/grad_norm"] = norm
        metrics["train/finite"] = finite.astype(jnp.float32)
        metrics[SKIPPED] = new.skipped  # updates skipped so far: the loop logs it without reading the state
        return new, metrics

    return train_step


def gradient_fn(loss_fn: LossFn, value_and_grad: Callable | None, trainable: PyTree | None,
                accum_steps: int) -> Callable:
    """``(params, batch_stats, aux, batch, rng, step) -> ((loss, (batch_stats, metrics)), grads)``.

    ``value_and_grad``: optional replacement for ``jax.value_and_grad(loss_fn, has_aux=True)`` with the same
    signature as ``loss_fn`` and the same output, for objectives whose update is not the gradient of a scalar
    (e.g. PCGrad). ``trainable``: a bool pytree like the params (``param_rules.trainable_mask``); the
    gradients of the other (frozen) leaves are replaced by zeros before anything reads them, so XLA never
    computes them (a frozen backbone costs its forward pass only), and ``train/grad_norm`` and the finiteness
    check cover the trained params. ``accum_steps`` (``config.optimizer.accum_steps``, k): gradient
    accumulation (:func:`accumulate`): one update from the mean gradient of k micro-batches of ``B/k``
    examples, computed one after the other (k times less activation memory); k=1 is the plain step.
    """
    grad_fn = value_and_grad or jax.value_and_grad(loss_fn, has_aux=True)
    if trainable is not None:  # frozen leaves: zeros, so their gradients are dead code for XLA
        grad_fn = masked(grad_fn, trainable)
    if accum_steps > 1:
        grad_fn = accumulate(grad_fn, accum_steps)
    return grad_fn


def _grad_norm(grads: PyTree, step: jax.Array, grad_norm: bool | None, every: int, last_step: int | None):
    """``‖grads‖₂`` as float32 for the step that ends at ``step`` (0 where it is not computed)."""

    def norm_of(grads: PyTree) -> jax.Array:
        return optax.tree.norm(grads).astype(jnp.float32)

    if grad_norm is False:
        return jnp.zeros((), jnp.float32)
    if every == 1:
        return norm_of(grads)
    return jax.lax.cond(is_grad_norm_step(step, every, last_step), norm_of, lambda g: jnp.zeros((), jnp.float32),
                        grads)


def _check_step_args(nan_policy: str, grad_norm_every: Any, grad_norm: bool | None, accum_steps: Any) -> None:
    if nan_policy not in ("error", "skip"):
        raise ValueError(f"config.train.nan_policy must be 'error' or 'skip', got {nan_policy!r}")
    if not isinstance(grad_norm_every, int) or grad_norm_every < 1:
        raise ValueError(f"grad_norm_every must be an int >= 1, got {grad_norm_every!r}")
    if grad_norm is False and nan_policy == "skip":
        raise ValueError("grad_norm=False cannot skip non-finite updates (nan_policy='skip' needs the gradient "
                         "norm on every step)")
    if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"config.optimizer.accum_steps must be an int >= 1, got {accum_steps!r}")


def masked(grad_fn: Callable, trainable: PyTree) -> Callable:
    """``grad_fn`` whose gradients of frozen leaves (``trainable`` False) are zeros (constants XLA folds)."""

    def fn(*args):
        out, grads = grad_fn(*args)
        return out, jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)

    return fn


def micro_batches(batch: Batch, k: int) -> Batch:
    """``[B, ...]`` leaves -> ``[k, B/k, ...]``; micro-batch ``j`` holds rows ``j, j+k, j+2k, ...``.

    The strided split (reshape to ``[B/k, k, ...]``, then swap the first two axes)
    keeps each device's rows on that device when the batch is sharded over its
    first axis, where a contiguous split would move rows between devices.
    """
    def split(x: jax.Array) -> jax.Array:
        if x.ndim == 0 or x.shape[0] % k:
            raise ValueError(f"config.optimizer.accum_steps={k} must divide the per-device batch: a batch leaf has "
                             f"shape {tuple(x.shape)}; lower accum_steps or change config.data.batch_size")
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def accumulate(grad_fn: Callable, k: int, unroll: int | bool | None = None) -> Callable:
    """Gradient accumulation: ``grad_fn`` over ``k`` micro-batches, one after the other (``lax.scan``).

    Same signature and output as ``grad_fn``: ``((loss, (batch_stats, metrics)),
    grads)`` with ``grads = (1/k) Σ_j ∇L_j``, ``loss`` and every metric the mean
    over the micro-batches. When the loss is a mean over examples (every
    objective's), ``(1/k) Σ_j ∇L_j`` over equal micro-batches is the gradient of
    the mean over their concatenation, so the update equals one step on the big
    batch (up to float summation order). Micro-batch ``j`` draws its randomness
    from ``fold_in(rng, j)`` (dropout masks differ from the big batch's).

    BatchNorm: each micro-batch normalises with its own statistics (``B/k``
    examples, not ``B``) and updates the running averages in turn (k EMA updates
    per step instead of one), so with BatchNorm in train mode the update is not
    the big batch's; frozen norms (``model.frozen_norms``) and norm-free models
    (LayerNorm, none) are exact.

    ``unroll``: micro-batches per loop iteration (``lax.scan``'s ``unroll``); ``None``: all ``k`` on CPUs,
    where XLA runs convolutions inside a loop body several times slower than the same ops unrolled
    (BENCHMARKS.md), else 1. The micro-batches still run one after the other: their gradients
    are summed in order, and each one's activations are dead once its backward pass is done.
    """
    if unroll is None:
        unroll = True if jax.default_backend() == "cpu" else 1

    def fn(params, batch_stats, aux, batch, rng, step):
        micro = micro_batches(batch, k)
        first = jax.tree.map(lambda x: x[0], micro)
        (_, (_, metrics0)), grads0 = jax.eval_shape(grad_fn, params, batch_stats, aux, first, rng, step)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), grads0)

        def body(carry, xs):
            g_sum, stats = carry
            j, mb = xs
            (loss, (stats, metrics)), grads = grad_fn(params, stats, aux, mb, jax.random.fold_in(rng, j), step)
            return (jax.tree.map(jnp.add, g_sum, grads), stats), (loss, metrics)

        (g_sum, batch_stats), (losses, metrics) = jax.lax.scan(body, (zeros, batch_stats),
                                                               (jnp.arange(k), micro), unroll=unroll)
        grads = jax.tree.map(lambda g: (g / k).astype(g.dtype), g_sum)
        metrics = jax.tree.map(lambda m, s: jnp.mean(m, axis=0).astype(s.dtype), metrics, metrics0)
        return (jnp.mean(losses), (batch_stats, metrics)), grads

    return fn


def make_eval_step(objective: Objective) -> Callable[[TrainState, Batch], dict]:
    """``eval_step(state, batch) -> sums``: the objective's masked sums over a batch.

    For classification: ``loss = Σ_b m_b CE_b``, ``accuracy = Σ_b m_b [argmax z_b = y_b]``
    and ``count = Σ_b m_b``; the loop adds them over batches and divides by the
    count once, so a padded last batch counts exactly its real examples.
    """

    def eval_step(state: TrainState, batch: Batch) -> dict:
        return objective.eval_sums(state.params, state.batch_stats, state.aux, batch)

    return eval_step
