"""Unsupervised domain adaptation, the shared part: target stream, two-domain pass, gradient reversal.

The methods (one file each) extend :class:`UnsupervisedDA`: ``dann`` (:mod:`.dann`), ``coral`` /
``mmd`` (:mod:`.coral_mmd`), ``cdan`` (:mod:`.cdan`), ``mcc`` (:mod:`.mcc`), ``mdd`` (:mod:`.mdd`),
``self_training`` (:mod:`.self_training`); target labels are never trained on.

Labelled source examples come from ``config.data`` (the standard stream);
unlabelled target examples from the objective's group ``config.objective.<name>``:

* ``target`` (dataset name, required), ``target_split`` / ``target_test_split``,
  ``target_data_dir`` ('' = ``config.data.data_dir``);
* ``target_pp``: preprocessing ops of the target train images; they must give
  the source images' shape (e.g. optdigits 8x8 -> resize 20 -> pad 28 for
  MNIST); ``target_eval_pp`` ([] = ``target_pp``, which must then be deterministic);
* ``target_batch_size`` (0 = the source batch size);
* ``weight``: the trade-off w of the adaptation term;
* ``layer``: ``'features'`` (the backbone output [B, D]) or ``'logits'`` [B, C] as f.

Train batches are ONE grain ``MapDataset`` (source batches zipped index by
index with target batches), so the iterator state is still ``{'next_index': k}``
and a resume is exact; a batch holds ``image`` [B, H, W, C], ``label`` [B]
(source) and ``target_image`` [B_t, H, W, C] (no target labels). ``test/*``
metrics are computed on the TARGET test split (its labels are used only there).

Both domains go through the model in one pass (``[x_s; x_t]``, so BatchNorm
sees both). With ``CE`` the source cross-entropy (mean over B_s) and ``term``
the method's adaptation term::

    L = CE + w·term(z_s, f_s, z_t, f_t)

Logged: ``train/loss`` (total), ``train/ce``, ``train/accuracy`` (source),
``train/da/<name>`` (the unweighted adaptation term) and the method's own.

The gradient reversal layer GRL_λ (:func:`gradient_reversal`) is the identity
forward and multiplies the gradient by −λ, with λ ramped by :func:`dann_lambda`;
:class:`DomainDiscriminator` is the MLP of DANN and CDAN.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections

from tl_jax.data import build_preprocess, load_split, train_dataset
from tl_jax.models.heads import head_dims
from tl_jax.objectives._checks import check_scalar, config_int, config_number
from tl_jax.objectives.base import Objective, PyTree, apply_model, hparam
from tl_jax.objectives.classification import accuracy, cross_entropy

LAYERS = ("features", "logits")


@jax.custom_vjp
def _grl(x: jax.Array, lam: jax.Array) -> jax.Array:
    return x


def _grl_fwd(x: jax.Array, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    return x, lam


def _grl_bwd(lam: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    rev = jax.tree_util.tree_map(lambda t: (-lam * t).astype(t.dtype), g)
    return rev, jnp.zeros_like(lam)


_grl.defvjp(_grl_fwd, _grl_bwd)


def gradient_reversal(x: jax.Array, lam: float | jax.Array) -> jax.Array:
    """Gradient reversal layer (Ganin & Lempitsky, 2015).

    forward: R(x) = x;   backward: ∂R/∂x = −λ·I,   ∂R/∂λ = 0

    Args:
      x: array (or pytree of arrays) of any shape.
      lam: scalar λ (Python number or traced array, e.g. :func:`dann_lambda`);
        it receives a zero cotangent.

    Returns:
      ``x`` unchanged.
    """
    check_scalar("lam", lam, low=None)
    return _grl(x, jnp.asarray(lam, jnp.float32))


def dann_lambda(progress: float | jax.Array, gamma: float = 10.0) -> jax.Array:
    """DANN adaptation-factor schedule (Ganin & Lempitsky, 2015).

    λ(p) = 2 / (1 + exp(−γ·p)) − 1,   p = training progress clipped to [0, 1]

    λ(0) = 0 and λ(1) = tanh(γ/2) ≈ 1 (0.99991 for γ = 10). Scalar -> scalar.
    """
    check_scalar("gamma", gamma, low=0.0)
    p = jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)
    return 2.0 / (1.0 + jnp.exp(-gamma * p)) - 1.0


def target_defaults(**extra: Any) -> dict:
    """The target-domain keys shared by every DA objective's config group, plus ``extra``."""
    return dict(target="", target_split="train", target_test_split="test", target_data_dir="", target_pp=[],
                target_eval_pp=[], target_batch_size=0, weight=1.0, layer="features", **extra)


def merge_domains(pair: tuple[dict, dict]) -> dict:
    """``(source batch, target batch)`` -> one batch with ``target_image`` (target labels dropped)."""
    source, target = pair
    return {**source, "target_image": target["image"]}


class UnsupervisedDA(Objective):
    """Shared machinery: the target stream, the one pass over all domains, ``CE + w·term``.

    Subclasses define :meth:`term` (and, with more streams, :meth:`images`).
    """

    def __init__(self, config: ml_collections.ConfigDict, model):
        super().__init__(config, model)
        self.where = f"config.objective.{self.name}"
        self.cfg = cfg = config.objective[self.name]
        if not cfg.target:
            raise ValueError(f"{self.where}.target must name the unlabelled target dataset (e.g. 'optdigits')")
        self.weight = config_number(f"{self.where}.weight", cfg.weight)
        config_int(f"{self.where}.target_batch_size", cfg.target_batch_size, low=0)
        if cfg.layer not in LAYERS:
            raise ValueError(f"{self.where}.layer must be one of {LAYERS}, got {cfg.layer!r}")
        self.total_steps = max(1, int(config.train.steps))

    @classmethod
    def traced_keys(cls, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        return (f"objective.{cls.name}.weight",)

    # -- data ---------------------------------------------------------------------------------
    def _target_split(self, split: str):
        return load_split(self.cfg.target, split, self.cfg.target_data_dir or self.config.data.data_dir)

    def target_batches(self, *, batch_size: int, seed: int, process_index: int, process_count: int
                       ) -> grain.MapDataset:
        """Infinite batches of the target train split after ``target_pp`` (shuffle seed ``seed + 1``)."""
        pp = build_preprocess(list(self.cfg.target_pp), where=f"{self.where}.target_pp")
        return train_dataset(self._target_split(self.cfg.target_split), pp,
                             batch_size=self.cfg.target_batch_size or batch_size, seed=seed + 1,
                             process_index=process_index, process_count=process_count)

    def train_dataset(self, standard: Any, *, batch_size: int, seed: int, process_index: int,
                      process_count: int) -> grain.MapDataset:
        """``standard`` zipped with infinite target batches (shuffle seed ``seed + 1``)."""
        target = self.target_batches(batch_size=batch_size, seed=seed, process_index=process_index,
                                     process_count=process_count)
        s_shape, t_shape = standard[0]["image"].shape[1:], target[0]["image"].shape[1:]
        if s_shape != t_shape:
            raise ValueError(f"{self.where}.target_pp gives target images of shape {t_shape}, the source images "
                             f"(config.data.train_pp) are {s_shape}")
        n = min(len(standard), len(target))  # both infinite (repeat); lengths differ with the batch sizes
        return grain.experimental.ZipMapDataset([standard[:n], target[:n]]).map(merge_domains)

    def eval_data(self, split: Any, preprocess: Any) -> tuple[Any, Any]:
        """The TARGET test split with ``target_eval_pp`` (or ``target_pp``)."""
        key = "target_eval_pp" if len(self.cfg.target_eval_pp) else "target_pp"
        pp = build_preprocess(list(self.cfg[key]), where=f"{self.where}.{key}")
        return self._target_split(self.cfg.target_test_split), pp

    # -- the maths ----------------------------------------------------------------------------
    def dims(self, params: PyTree) -> tuple[int, int]:
        """``(D, C)``: the feature and class sizes read from the model's head."""
        dims = head_dims(params.get("head", {}))
        if dims is None:
            raise ValueError(f"{self.name}: the model has no head/kernel (or head/logits/kernel) to read the "
                             f"feature size from")
        return dims

    def images(self, batch: dict) -> list[jax.Array]:
        """The image batches that go through the model together: source, target (and more, e.g. a second view)."""
        if "target_image" not in batch:
            raise KeyError(f"{self.name}: the batch has no 'target_image' (keys {sorted(batch)}); "
                           f"train batches come from {type(self).__name__}.train_dataset")
        return [batch["image"], batch["target_image"]]

    def outputs(self, params: PyTree, batch_stats: PyTree, batch: dict, rng: jax.Array | None):
        """One pass over ``[x_s; x_t; …]``: ``(z_s, f_s, z_t, f_t, logits of further images, new_batch_stats)``."""
        parts = self.images(batch)
        ns, nt = parts[0].shape[0], parts[1].shape[0]
        both = {"image": jnp.concatenate(parts, axis=0)}
        (z, f), batch_stats = apply_model(self.model, self.model_params(params), batch_stats, both, train=True,
                                          rng=rng, return_features=True)
        return z[:ns], f[:ns], z[ns:ns + nt], f[ns:ns + nt], z[ns + nt:], batch_stats

    def layer(self, zs: jax.Array, fs: jax.Array, zt: jax.Array, ft: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(f_s, f_t)`` of ``config.objective.<name>.layer``: the features or the logits."""
        return (fs, ft) if self.cfg.layer == "features" else (zs, zt)

    def term(self, params: PyTree, aux: PyTree, zs, fs, zt, ft, extra_logits, step
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The unweighted adaptation term and extra metrics (subclasses)."""
        raise NotImplementedError

    def objective_loss(self, params, batch_stats, aux, batch, rng, step):
        zs, fs, zt, ft, extra_logits, batch_stats = self.outputs(params, batch_stats, batch, rng)
        ce = cross_entropy(zs, batch["label"], label_smoothing=self.label_smoothing).mean()
        term, extra = self.term(params, aux, zs, fs, zt, ft, extra_logits, step)
        total = ce + hparam(aux, f"objective.{self.name}.weight", self.weight) * term
        metrics = {"train/loss": total, "train/ce": ce, "train/accuracy": accuracy(zs, batch["label"]).mean(),
                   f"train/da/{self.name}": term, **extra}
        return total, (batch_stats, metrics)


class DomainDiscriminator(nn.Module):
    """MLP ``[B, D] -> [B]`` domain logits: (Dense(hidden) [-> LayerNorm] -> ReLU) × depth -> Dense(1).

    LayerNorm (per example, so no batch statistics to keep) plays the role of
    the BatchNorm in TLlib's discriminator: the feature scale cannot be used to
    fool it, which keeps the adversarial game stable.
    """

    hidden: int = 256
    depth: int = 2
    layer_norm: bool = True

    @nn.compact
    def __call__(self, f: jax.Array) -> jax.Array:
        for i in range(self.depth):
            f = nn.Dense(self.hidden, name=f"fc{i}")(f)
            if self.layer_norm:
                f = nn.LayerNorm(name=f"ln{i}")(f)
            f = nn.relu(f)
        return nn.Dense(1, name="out")(f)[:, 0]
