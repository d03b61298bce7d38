"""DELTA, attention-weighted feature distance to the pretrained model (Li et al. ICLR 2019): ``delta``.

A :class:`~tl_jax.objectives.feature_regularized.FeatureRegularized` objective::

    L = CE + w·(1/B) Σ_b Σ_c a_c (f_bc − f*_bc)²         (w = 0.01)

* ``delta``: f* = the features of the run's STARTING model (``init_from``
  merged: the pretrained backbone) on the same batch, in inference mode; its
  variables are copied once into ``state.aux['delta_pretrained']`` (constants,
  saved with checkpoints, so a resumed run keeps them). The forward pass of
  the pretrained copy costs about one extra forward per step.
  a [D] is DELTA's supervised channel attention (``attention=true``, the
  paper's method; ``false``: a_c = 1, the unweighted "L2-FE" form). Not every
  pretrained channel matters for the target task: pinning the ones the task
  does not use only stops them from adapting, so the pull toward f* is
  weighted by how much the TARGET loss needs each channel. Measured once at
  build time, from the pretrained model on the run's training examples (shots /
  validation carve-out applied, ``config.data.eval_pp``, inference mode):

    1. f* [N, D] of those N examples, and a linear head (W [D, K], b) fitted on
       them by L2-regularised logistic regression (:func:`fit_probe`: the
       starting model's head is usually fresh, and ΔL needs a head that already
       solves the target task; TLlib's DELTA likewise trains a classifier on
       the pretrained backbone before measuring);
    2. ΔL_c = (1/N) Σ_n [CE(f*_n with channel c zeroed) − CE(f*_n)], all D
       channels at once (:func:`channel_loss_increase`);
    3. a = D · softmax(ẑ / T), ẑ = (ΔL − mean ΔL) / std ΔL (``temperature`` T,
       default 5 as TLlib: :func:`delta_attention`);
       the weights average 1, so w keeps the scale of the unweighted form.

  a is stored in ``state.aux['delta_attention']`` (saved with checkpoints: a
  resumed run uses the same weights). One-off cost: one inference pass over
  the training examples and a D·K-parameter convex fit.
"""
from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tl_jax.objectives._checks import check_scalar, config_number
from tl_jax.objectives.base import PyTree, apply_model, register
from tl_jax.objectives.classification import at_least_f32, cross_entropy
from tl_jax.objectives.feature_regularized import FeatureRegularized, training_outputs


def delta_loss(features: jax.Array, pretrained_features: jax.Array, attention: jax.Array | None = None
               ) -> jax.Array:
    """DELTA's behavioural regulariser (Li et al. ICLR 2019): attention-weighted feature-map distance
    to the pretrained network on the same inputs.

    With channels c on the last axis and every other non-batch axis (spatial
    positions) summed::

        L = (1/B) Σ_b Σ_c w_c · ‖FM_bc(θ, x_b) − FM_bc(θ*, x_b)‖²

    θ* = the pretrained weights (``pretrained_features`` is gradient-stopped);
    w = ``attention`` [C] (None: w_c = 1, the paper's unweighted "L2-FE" variant).
    DELTA's supervised attention (how much the pretrained model's loss grows
    when channel c is removed, softmax-normalised) is :func:`delta_attention`.

    Args:
      features / pretrained_features: [B, C] or [B, ..., C], same shape.
      attention: optional [C] non-negative weights.

    Returns:
      scalar.
    """
    if jnp.shape(features) != jnp.shape(pretrained_features) or jnp.ndim(features) < 2:
        raise ValueError(f"features and pretrained_features must have one shape [B, ..., C], got "
                         f"{jnp.shape(features)} and {jnp.shape(pretrained_features)}")
    diff = at_least_f32(features) - jax.lax.stop_gradient(at_least_f32(pretrained_features))
    per_channel = jnp.sum(jnp.square(diff).reshape(diff.shape[0], -1, diff.shape[-1]), axis=1)   # [B, C]
    if attention is not None:
        if jnp.shape(attention) != (diff.shape[-1],):
            raise ValueError(f"attention must have shape [C] = ({diff.shape[-1]},), got {jnp.shape(attention)}")
        per_channel = per_channel * jax.lax.stop_gradient(attention)[None, :]
    return jnp.sum(per_channel) / diff.shape[0]


def channel_loss_increase(features: jax.Array, labels: jax.Array, kernel: jax.Array, bias: jax.Array,
                          chunk_elements: int = 2**24) -> jax.Array:
    """DELTA's per-channel loss increase of a linear head: ΔL_c = CE(f with channel c zeroed) − CE(f).

    With z = f W + b [N, K] and p = softmax(z), zeroing channel c of example n
    moves its logits by −f_nc W_c, so every channel at once ([N, D, K], no loop)::

        ΔCE_nc = log Σ_k p_nk exp(−f_nc W_ck) + f_nc W_{c, y_n}      ΔL_c = (1/N) Σ_n ΔCE_nc

    (the difference written out, not two cross-entropies subtracted: the
    increases are small next to the CE itself). Rows are processed in chunks
    of about ``chunk_elements`` [n, D, K] entries, so memory stays bounded.

    Args:
      features: [N, D]; labels: [N] ints in [0, K); kernel: [D, K]; bias: [K].

    Returns:
      [D] float32.
    """
    f, w, b = at_least_f32(features), at_least_f32(kernel), at_least_f32(bias)
    if f.ndim != 2 or w.shape != (f.shape[1], b.shape[-1]) or jnp.shape(labels) != f.shape[:1]:
        raise ValueError(f"features [N, D], labels [N], kernel [D, K], bias [K] must agree, got {f.shape}, "
                         f"{jnp.shape(labels)}, {w.shape}, {b.shape}")
    n, d = f.shape
    rows = max(1, chunk_elements // max(1, d * w.shape[1]))
    total = jnp.zeros((d,), jnp.float32)
    for i in range(0, n, rows):
        total = total + _loss_increase_sum(f[i:i + rows], jnp.asarray(labels[i:i + rows]), w, b)
    return total / n


@jax.jit
def _loss_increase_sum(f: jax.Array, y: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    log_p = jax.nn.log_softmax(f @ w + b, axis=-1)                                        # [n, K]
    shifted = jax.nn.logsumexp(log_p[:, None, :] - f[:, :, None] * w[None], axis=-1)      # [n, D]
    return jnp.sum(shifted + f * w[:, y].T, axis=0)


def delta_attention(loss_increase: jax.Array, temperature: float = 1.0, standardize: bool = False) -> jax.Array:
    """DELTA's supervised channel attention: w = C · softmax(s / T).

    s = ΔL, or its z-score (ΔL − mean ΔL) / std ΔL with ``standardize`` (as
    TLlib's DELTA does, with T = 5: the raw increases of one channel out of
    hundreds are tiny and their scale depends on the data, so a fixed T means
    the same sharpness on every task; equal ΔL give s = 0, uniform weights).
    ΔL_c = (loss of the pretrained model with channel c zeroed) − (its loss), [C]
    (:func:`channel_loss_increase`); the weights sum to C (mean 1), so the
    scale matches the unweighted variant.
    """
    check_scalar("temperature", temperature, low=0.0, low_open=True)
    x = at_least_f32(loss_increase)
    if standardize:
        x = x - jnp.mean(x)
        std = jnp.sqrt(jnp.mean(jnp.square(x)))
        x = jnp.where(std > 0, x / jnp.where(std > 0, std, 1.0), 0.0)
    return x.shape[-1] * jax.nn.softmax(x / temperature)


def fit_probe(features: jax.Array, labels: jax.Array, num_classes: int, l2: float = 1e-3, steps: int = 200
              ) -> tuple[jax.Array, jax.Array]:
    """``(kernel [D, K], bias [K])`` minimising (1/N) Σ_n CE(f_n W + b, y_n) + (l2/2)‖W‖²: the
    L2-regularised multinomial logistic regression of frozen features [N, D], ``steps`` L-BFGS
    iterations from zero (convex: the start only affects how fast it gets there)."""
    f, y = jnp.asarray(features, jnp.float32), jnp.asarray(labels)
    p0 = {"kernel": jnp.zeros((f.shape[1], num_classes), jnp.float32), "bias": jnp.zeros((num_classes,), jnp.float32)}

    def objective(p):
        return cross_entropy(f @ p["kernel"] + p["bias"], y).mean() + 0.5 * l2 * jnp.sum(jnp.square(p["kernel"]))

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def body(_, carry):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(p, updates), state

    p, _ = jax.jit(lambda p: jax.lax.fori_loop(0, steps, body, (p, opt.init(p))))(p0)
    return p["kernel"], p["bias"]


@register
class DELTA(FeatureRegularized):
    """DELTA: attention-weighted feature distance to the pretrained (starting) model (see the module docstring)."""

    name: ClassVar[str] = "delta"
    defaults: ClassVar[dict] = {"weight": 0.01, "attention": True, "temperature": 5.0}
    AUX: ClassVar[str] = "delta_pretrained"
    ATTENTION: ClassVar[str] = "delta_attention"

    def __init__(self, config: ml_collections.ConfigDict, model):
        super().__init__(config, model)
        a, t = self.cfg.attention, self.cfg.temperature
        if not isinstance(a, bool):
            raise ValueError(f"{self.where}.attention must be true or false, got {a!r}")
        self.attention, self.temperature = a, config_number(f"{self.where}.temperature", t, low_open=True)

    def channel_attention(self, params: PyTree, batch_stats: PyTree) -> tuple[np.ndarray, np.ndarray]:
        """``(w [D], ΔL [D])`` of the starting model on the run's training examples (module docstring)."""
        def features(variables, batch):
            (_, f), _ = apply_model(self.model, *variables, batch, train=False, return_features=True)
            return f

        f, y = training_outputs(self.config, features, (params, batch_stats), int(self.config.data.eval_batch_size))
        kernel, bias = fit_probe(f, y, self.model.num_classes)
        increase = channel_loss_increase(f, y, kernel, bias)
        return np.asarray(delta_attention(increase, self.temperature, standardize=True)), np.asarray(increase)

    def init_extra(self, rng, params, batch_stats):
        copy = lambda t: jax.tree.map(lambda x: np.array(x, copy=True), t)  # noqa: E731
        pre = {"params": copy(self.model_params(params)), "batch_stats": copy(batch_stats)}
        aux = {self.AUX: pre}
        if self.attention:
            aux[self.ATTENTION] = self.channel_attention(pre["params"], pre["batch_stats"])[0]
        return {}, aux

    def term(self, params, aux, batch, features, rng):
        pre = aux[self.AUX]
        (_, f0), _ = apply_model(self.model, pre["params"], pre["batch_stats"], batch, train=False,
                                 return_features=True)
        return delta_loss(features, jax.lax.stop_gradient(f0), aux[self.ATTENTION] if self.attention else None)
