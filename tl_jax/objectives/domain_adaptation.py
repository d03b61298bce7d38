"""Unsupervised domain adaptation: ``dann``, ``coral``, ``mmd`` (target labels never trained on).

Labelled source examples come from ``config.data`` (the standard stream);
unlabelled target examples from the objective's group ``config.objective.<name>``:

* ``target`` (dataset name, required), ``target_split`` / ``target_test_split``,
  ``target_data_dir`` ('' = ``config.data.data_dir``);
* ``target_pp``: preprocessing ops of the target train images; they must give
  the source images' shape (e.g. optdigits 8x8 -> resize 20 -> pad 28 for
  MNIST); ``target_eval_pp`` ([] = ``target_pp``, which must then be deterministic);
* ``target_batch_size`` (0 = the source batch size);
* ``weight``: the trade-off w of the adaptation term.

Train batches are ONE grain ``MapDataset`` (source batches zipped index by
index with target batches), so the iterator state is still ``{'next_index': k}``
and a resume is exact; a batch holds ``image`` [B, H, W, C], ``label`` [B]
(source) and ``target_image`` [B_t, H, W, C] (no target labels). ``test/*``
metrics are computed on the TARGET test split (its labels are used only there).

Both domains go through the model in one pass (``[x_s; x_t]``, so BatchNorm
sees both); f = the backbone features ``[B, D]`` (``layer='features'``) or
the logits ``[B, C]`` (``layer='logits'``). With ``CE`` the source
cross-entropy (mean over B_s)::

    dann:   L = CE + w·L_d(D_ψ(GRL_λ(f_s)), D_ψ(GRL_λ(f_t))),   λ = dann_lambda(step / train.steps, gamma)
    coral:  L = CE + w·‖C_s − C_t‖_F² / (4 d²)
    mmd:    L = CE + w·MMD²_k(f_s, f_t),   k = Σ_k exp(−‖x − y‖² / β_k)   (multi-bandwidth)

DANN's discriminator D_ψ (an MLP, ``hidden`` units × ``depth`` layers, each
with a LayerNorm if ``layer_norm``, one logit) is a trainable extra under
``params['discriminator']``; the gradient
reversal layer GRL_λ is the identity forward and multiplies the gradient
reaching the backbone by −λ, so ψ minimises L_d while the features maximise it.

Logged: ``train/loss`` (total), ``train/ce``, ``train/accuracy`` (source),
``train/da/<name>`` (the unweighted adaptation term), and for DANN
``train/da/lambda`` and ``train/da/domain_accuracy``.
"""
from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tl_jax.losses.classification import accuracy, cross_entropy
from tl_jax.losses.domain_adaptation import (coral_loss, dann_lambda, domain_adversarial_loss, gradient_reversal,
                                             mmd_loss)
from tl_jax.models.heads import head_dims
from tl_jax.objectives.base import Batch, Objective, PyTree, apply_model, hparam, register

LAYERS = ("features", "logits")


def target_defaults(**extra: Any) -> dict:
    """The target-domain keys shared by every DA objective's config group, plus ``extra``."""
    return dict(target="", target_split="train", target_test_split="test", target_data_dir="", target_pp=[],
                target_eval_pp=[], target_batch_size=0, weight=1.0, layer="features", **extra)


def merge_domains(pair: tuple[dict, dict]) -> dict:
    """``(source batch, target batch)`` -> one batch with ``target_image`` (target labels dropped)."""
    source, target = pair
    return {**source, "target_image": target["image"]}


def _number(cfg: ml_collections.ConfigDict, key: str, where: str, *, low: float = 0.0) -> float:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < low:
        raise ValueError(f"{where}.{key} must be a finite number >= {low}, got {value!r}")
    return float(value)


class UnsupervisedDA(Objective):
    """Shared machinery: the target stream, the two-domain forward pass, CE + w·term."""

    def __init__(self, config: ml_collections.ConfigDict, model):
        super().__init__(config, model)
        self.where = f"config.objective.{self.name}"
        self.cfg = cfg = config.objective[self.name]
        if not cfg.target:
            raise ValueError(f"{self.where}.target must name the unlabelled target dataset (e.g. 'optdigits')")
        self.weight = _number(cfg, "weight", self.where)
        if isinstance(cfg.target_batch_size, bool) or not isinstance(cfg.target_batch_size, int) \
                or cfg.target_batch_size < 0:
            raise ValueError(f"{self.where}.target_batch_size must be an int >= 0, got {cfg.target_batch_size!r}")
        if cfg.layer not in LAYERS:
            raise ValueError(f"{self.where}.layer must be one of {LAYERS}, got {cfg.layer!r}")
        self.total_steps = max(1, int(config.train.steps))

    @classmethod
    def traced_keys(cls, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        return (f"objective.{cls.name}.weight",)

    # -- data ---------------------------------------------------------------------------------
    def _target_split(self, split: str):
        from tl_jax.data import load_split

        return load_split(self.cfg.target, split, self.cfg.target_data_dir or self.config.data.data_dir)

    def train_dataset(self, standard: Any, *, batch_size: int, seed: int, process_index: int,
                      process_count: int) -> grain.MapDataset:
        """``standard`` zipped with infinite target batches (shuffle seed ``seed + 1``)."""
        from tl_jax.data import build_preprocess, train_dataset

        pp = build_preprocess(list(self.cfg.target_pp), where=f"{self.where}.target_pp")
        target = train_dataset(self._target_split(self.cfg.target_split), pp,
                               batch_size=self.cfg.target_batch_size or batch_size, seed=seed + 1,
                               process_index=process_index, process_count=process_count)
        s_shape, t_shape = standard[0]["image"].shape[1:], target[0]["image"].shape[1:]
        if s_shape != t_shape:
            raise ValueError(f"{self.where}.target_pp gives target images of shape {t_shape}, the source images "
                             f"(config.data.train_pp) are {s_shape}")
        n = min(len(standard), len(target))  # both infinite (repeat); lengths differ with the batch sizes
        return grain.experimental.ZipMapDataset([standard[:n], target[:n]]).map(merge_domains)

    def eval_data(self, split: Any, preprocess: Any) -> tuple[Any, Any]:
        """The TARGET test split with ``target_eval_pp`` (or ``target_pp``)."""
        from tl_jax.data import build_preprocess

        key = "target_eval_pp" if len(self.cfg.target_eval_pp) else "target_pp"
        pp = build_preprocess(list(self.cfg[key]), where=f"{self.where}.{key}")
        return self._target_split(self.cfg.target_test_split), pp

    # -- the maths ----------------------------------------------------------------------------
    def forward(self, params: PyTree, batch_stats: PyTree, batch: Batch, rng: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array, PyTree]:
        """One pass over ``[x_s; x_t]``: ``(source logits [B_s, C], f_s, f_t, new_batch_stats)``."""
        if "target_image" not in batch:
            raise KeyError(f"{self.name}: the batch has no 'target_image' (keys {sorted(batch)}); "
                           f"train batches come from {type(self).__name__}.train_dataset")
        ns = batch["image"].shape[0]
        both = {"image": jnp.concatenate([batch["image"], batch["target_image"]], axis=0)}
        (logits, feats), batch_stats = apply_model(self.model, self.model_params(params), batch_stats, both,
                                                   train=True, rng=rng, return_features=True)
        f = feats if self.cfg.layer == "features" else logits
        return logits[:ns], f[:ns], f[ns:], batch_stats

    def adaptation(self, params: PyTree, fs: jax.Array, ft: jax.Array, step: jax.Array
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The unweighted adaptation term and extra metrics (subclasses)."""
        raise NotImplementedError

    def loss(self, params, batch_stats, aux, batch, rng, step):
        zs, fs, ft, batch_stats = self.forward(params, batch_stats, batch, rng)
        ce = cross_entropy(zs, batch["label"], label_smoothing=self.label_smoothing).mean()
        term, extra = self.adaptation(params, fs, ft, step)
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


@register
class DANN(UnsupervisedDA):
    """Domain-adversarial training (Ganin & Lempitsky 2015); see the module docstring."""

    name: ClassVar[str] = "dann"
    defaults: ClassVar[dict] = target_defaults(gamma=10.0, hidden=256, depth=2, layer_norm=True)
    extra_keys: ClassVar[tuple[str, ...]] = ("discriminator",)

    def __init__(self, config: ml_collections.ConfigDict, model):
        super().__init__(config, model)
        self.gamma = _number(self.cfg, "gamma", self.where)
        for key in ("hidden", "depth"):
            if isinstance(self.cfg[key], bool) or not isinstance(self.cfg[key], int) or self.cfg[key] < 1:
                raise ValueError(f"{self.where}.{key} must be an int >= 1, got {self.cfg[key]!r}")
        self.discriminator = DomainDiscriminator(self.cfg.hidden, self.cfg.depth, bool(self.cfg.layer_norm))

    def init_extra(self, rng: jax.Array, params: PyTree, batch_stats: PyTree) -> tuple[dict, dict]:
        dims = head_dims(params.get("head", {}))  # (D, C) of a linear or MLP head
        if dims is None:
            raise ValueError(f"{self.name}: the model has no head/kernel (or head/logits/kernel) to read the "
                             f"feature size from")
        dim = dims[0] if self.cfg.layer == "features" else dims[1]
        disc = self.discriminator.init(rng, jnp.zeros((1, dim), jnp.float32))["params"]
        return {"discriminator": disc}, {}

    def lam(self, step: jax.Array) -> jax.Array:
        """GRL coefficient λ = 2 / (1 + exp(−γ·p)) − 1, p = step / config.train.steps."""
        return dann_lambda(jnp.asarray(step, jnp.float32) / self.total_steps, self.gamma)

    def adaptation(self, params, fs, ft, step):
        lam = self.lam(step)
        ns = fs.shape[0]
        d = self.discriminator.apply({"params": params["discriminator"]},
                                     gradient_reversal(jnp.concatenate([fs, ft], axis=0), lam))
        term = domain_adversarial_loss(d[:ns], d[ns:])
        correct = jnp.concatenate([d[:ns] > 0, d[ns:] <= 0]).astype(jnp.float32)
        return term, {"train/da/lambda": lam, "train/da/domain_accuracy": jnp.mean(correct)}


@register
class CORAL(UnsupervisedDA):
    """Deep CORAL (Sun & Saenko 2016): match the feature covariances; see the module docstring."""

    name: ClassVar[str] = "coral"
    defaults: ClassVar[dict] = target_defaults()

    def adaptation(self, params, fs, ft, step):
        return coral_loss(fs, ft), {}


@register
class MMD(UnsupervisedDA):
    """Multi-kernel MMD (DAN, Long et al. 2015) on the features; see the module docstring."""

    name: ClassVar[str] = "mmd"
    defaults: ClassVar[dict] = target_defaults(kernel_mul=2.0, num_kernels=5)

    def __init__(self, config: ml_collections.ConfigDict, model):
        super().__init__(config, model)
        self.kernel_mul = _number(self.cfg, "kernel_mul", self.where)
        if self.kernel_mul <= 0:
            raise ValueError(f"{self.where}.kernel_mul must be > 0, got {self.kernel_mul!r}")
        if isinstance(self.cfg.num_kernels, bool) or not isinstance(self.cfg.num_kernels, int) \
                or self.cfg.num_kernels < 1:
            raise ValueError(f"{self.where}.num_kernels must be an int >= 1, got {self.cfg.num_kernels!r}")

    def adaptation(self, params, fs, ft, step):
        return mmd_loss(fs, ft, kernel_mul=self.kernel_mul, num_kernels=self.cfg.num_kernels), {}
