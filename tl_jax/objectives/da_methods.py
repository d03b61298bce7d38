"""More unsupervised domain adaptation: ``cdan``, ``mcc``, ``mdd``, ``self_training``.

They share :class:`~tl_jax.objectives.domain_adaptation.UnsupervisedDA`'s
target stream, config keys (``target``, ``target_pp``, ``weight``, ...), the
one-pass forward over ``[x_s; x_t]`` and ``test/*`` on the target test split.
With ``CE`` the source cross-entropy, f the backbone features, g = softmax of
the logits z, w = ``weight``::

    cdan:          L = CE + w·CDAN(D_ψ(GRL_λ(f ⊗ g)))   (+E: entropy=True; randomized_dim > 0: (f R_f) ⊙ (g R_g) / √d)
    mcc:           L = CE + w·MCC(z_t; T = temperature)
    mdd:           L = CE + w·MDD(z_s, h'(GRL_λ'(f_s)), z_t, h'(GRL_λ'(f_t)); γ = margin)
    self_training: L = CE + w·(1/B_t) Σ_b [max p^weak_b ≥ τ]·CE(z^strong_b, argmax p^weak_b)

λ = dann_lambda(step / train.steps, gamma) (CDAN) and λ' = grl_max·dann_lambda(...) (MDD,
TLlib's warm start to 0.1). CDAN's discriminator (``params['discriminator']``,
the DANN MLP) reads the C·D-dim map (or ``randomized_dim``; the fixed random
matrices R_f, R_g live in ``state.aux['cdan_random']``); g is gradient-stopped.
The full map is C·D wide (5,120 for 10 classes and the small CNN), which makes
the discriminator's first layer as costly as the CNN itself (about 2x a plain
step in ``benchmarks/methods_bench.py``); ``randomized_dim=1024`` brings it to ~1.5x.
MDD's adversarial head h' (``params['adversary']``: Dense(hidden) → ReLU → Dense(C),
or one Dense with hidden=0) is trained to agree with the main head on the
source and disagree on the target; the features, through the GRL, to prevent it.

``self_training`` (FixMatch-style): every unlabelled target example is
preprocessed by ``target_pp`` and then twice in the data pipeline, by the
ops ``weak_pp`` and by ``strong_pp`` (lists of the ordinary preprocessing ops,
e.g. weak = a 1-pixel ``random_crop``, strong = a 3-pixel ``random_crop`` +
``flip_lr``), into ``target_image`` (weak) and ``target_strong_image``; the
draws come from grain's per-index ``random_map`` rng, so batches depend only
on the seed and the position (exact resume). The pseudo-labels come from the
weak view (gradient-stopped); ``threshold`` τ.

Formulas and papers: :mod:`tl_jax.losses.da_methods`. Logged besides
``train/ce``, ``train/da/<name>``: ``train/da/lambda`` (cdan, mdd),
``train/da/domain_accuracy`` (cdan), ``train/da/mask_rate`` (self_training).
"""
from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections

from tl_jax.losses.classification import accuracy, cross_entropy
from tl_jax.losses.da_methods import cdan_loss, fixmatch_loss, mcc_loss, mdd_loss, multilinear_map, \
    randomized_multilinear_map
from tl_jax.losses.domain_adaptation import dann_lambda, gradient_reversal
from tl_jax.models.heads import head_dims
from tl_jax.objectives.base import PyTree, apply_model, hparam, register
from tl_jax.objectives.domain_adaptation import DomainDiscriminator, UnsupervisedDA, _number, target_defaults


def _int(cfg: ml_collections.ConfigDict, key: str, where: str, low: int) -> int:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{where}.{key} must be an int >= {low}, got {v!r}")
    return v


class _LogitDA(UnsupervisedDA):
    """The two-domain pass returning logits and features of both domains; loss = CE + w·term."""

    def dims(self, params: PyTree) -> tuple[int, int]:
        dims = head_dims(params.get("head", {}))
        if dims is None:
            raise ValueError(f"{self.name}: the model has no head/kernel (or head/logits/kernel) to read the "
                             f"feature size from")
        return dims

    def images(self, batch: dict) -> list[jax.Array]:
        if "target_image" not in batch:
            raise KeyError(f"{self.name}: the batch has no 'target_image' (keys {sorted(batch)}); "
                           f"train batches come from {type(self).__name__}.train_dataset")
        return [batch["image"], batch["target_image"]]

    def term(self, params: PyTree, aux: PyTree, zs, fs, zt, ft, extra_logits, step
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        raise NotImplementedError

    def loss(self, params, batch_stats, aux, batch, rng, step):
        parts = self.images(batch)
        sizes = [p.shape[0] for p in parts]
        both = {"image": jnp.concatenate(parts, axis=0)}
        (z, f), batch_stats = apply_model(self.model, self.model_params(params), batch_stats, both, train=True,
                                          rng=rng, return_features=True)
        ns, nt = sizes[0], sizes[1]
        zs, fs, zt, ft = z[:ns], f[:ns], z[ns:ns + nt], f[ns:ns + nt]
        ce = cross_entropy(zs, batch["label"], label_smoothing=self.label_smoothing).mean()
        term, extra = self.term(params, aux, zs, fs, zt, ft, z[ns + nt:], step)
        total = ce + hparam(aux, f"objective.{self.name}.weight", self.weight) * term
        metrics = {"train/loss": total, "train/ce": ce, "train/accuracy": accuracy(zs, batch["label"]).mean(),
                   f"train/da/{self.name}": term, **extra}
        return total, (batch_stats, metrics)


@register
class CDAN(_LogitDA):
    """Conditional domain-adversarial network (Long et al. 2018), +E with ``entropy=True``."""

    name: ClassVar[str] = "cdan"
    defaults: ClassVar[dict] = target_defaults(entropy=True, gamma=10.0, hidden=256, depth=2, layer_norm=True,
                                               randomized_dim=0)
    extra_keys: ClassVar[tuple[str, ...]] = ("discriminator",)

    def __init__(self, config: ml_collections.ConfigDict, model):
        super().__init__(config, model)
        self.gamma = _number(self.cfg, "gamma", self.where)
        hidden, depth = _int(self.cfg, "hidden", self.where, 1), _int(self.cfg, "depth", self.where, 1)
        self.randomized_dim = _int(self.cfg, "randomized_dim", self.where, 0)
        if not isinstance(self.cfg.entropy, bool):
            raise ValueError(f"{self.where}.entropy must be true or false, got {self.cfg.entropy!r}")
        self.discriminator = DomainDiscriminator(hidden, depth, bool(self.cfg.layer_norm))

    def init_extra(self, rng, params, batch_stats):
        d, c = self.dims(params)
        d = c if self.cfg.layer == "logits" else d
        aux = {}
        if self.randomized_dim:
            rf, rg = jax.random.split(jax.random.fold_in(rng, 7))
            aux["cdan_random"] = {"r_f": jax.random.normal(rf, (d, self.randomized_dim)),
                                  "r_g": jax.random.normal(rg, (c, self.randomized_dim))}
        width = self.randomized_dim or c * d
        disc = self.discriminator.init(rng, jnp.zeros((1, width), jnp.float32))["params"]
        return {"discriminator": disc}, aux

    def term(self, params, aux, zs, fs, zt, ft, extra_logits, step):
        if self.cfg.layer == "logits":
            fs, ft = zs, zt
        lam = dann_lambda(jnp.asarray(step, jnp.float32) / self.total_steps, self.gamma)
        f = jnp.concatenate([fs, ft], axis=0)
        g = jax.lax.stop_gradient(jax.nn.softmax(jnp.concatenate([zs, zt], axis=0).astype(jnp.float32)))
        f = gradient_reversal(f, lam)
        if self.randomized_dim:
            h = randomized_multilinear_map(f, g, aux["cdan_random"]["r_f"], aux["cdan_random"]["r_g"])
        else:
            h = multilinear_map(f, g)
        d = self.discriminator.apply({"params": params["discriminator"]}, h)
        ns = zs.shape[0]
        term = cdan_loss(d[:ns], d[ns:], g[:ns], g[ns:], entropy_conditioning=self.cfg.entropy)
        correct = jnp.concatenate([d[:ns] > 0, d[ns:] <= 0]).astype(jnp.float32)
        return term, {"train/da/lambda": lam, "train/da/domain_accuracy": jnp.mean(correct)}


@register
class MCC(_LogitDA):
    """Minimum class confusion (Jin et al. 2020) on the target predictions."""

    name: ClassVar[str] = "mcc"
    defaults: ClassVar[dict] = target_defaults(temperature=2.5)

    def __init__(self, config: ml_collections.ConfigDict, model):
        super().__init__(config, model)
        self.temperature = _number(self.cfg, "temperature", self.where)
        if self.temperature <= 0:
            raise ValueError(f"{self.where}.temperature must be > 0, got {self.temperature!r}")

    def term(self, params, aux, zs, fs, zt, ft, extra_logits, step):
        return mcc_loss(zt, self.temperature), {}


class AdversarialHead(nn.Module):
    """MDD's auxiliary classifier h': [B, D] -> [B, C] (Dense(hidden) -> ReLU -> Dense(C); hidden=0: linear)."""

    num_classes: int
    hidden: int = 256

    @nn.compact
    def __call__(self, f: jax.Array) -> jax.Array:
        if self.hidden:
            f = nn.relu(nn.Dense(self.hidden, name="fc0")(f))
        return nn.Dense(self.num_classes, name="out")(f)


@register
class MDD(_LogitDA):
    """Margin disparity discrepancy (Zhang et al. 2019) with an adversarial head behind a GRL."""

    name: ClassVar[str] = "mdd"
    defaults: ClassVar[dict] = target_defaults(margin=4.0, gamma=10.0, grl_max=0.1, hidden=256)
    extra_keys: ClassVar[tuple[str, ...]] = ("adversary",)

    def __init__(self, config: ml_collections.ConfigDict, model):
        super().__init__(config, model)
        self.margin = _number(self.cfg, "margin", self.where)
        self.gamma = _number(self.cfg, "gamma", self.where)
        self.grl_max = _number(self.cfg, "grl_max", self.where)
        if self.margin <= 0:
            raise ValueError(f"{self.where}.margin must be > 0, got {self.margin!r}")
        if self.cfg.layer != "features":
            raise ValueError(f"{self.where}.layer must be 'features' (the adversarial head reads the features)")
        self.adversary = AdversarialHead(model.num_classes, _int(self.cfg, "hidden", self.where, 0))

    def init_extra(self, rng, params, batch_stats):
        d, _ = self.dims(params)
        return {"adversary": self.adversary.init(rng, jnp.zeros((1, d), jnp.float32))["params"]}, {}

    def term(self, params, aux, zs, fs, zt, ft, extra_logits, step):
        lam = self.grl_max * dann_lambda(jnp.asarray(step, jnp.float32) / self.total_steps, self.gamma)
        adv = self.adversary.apply({"params": params["adversary"]},
                                   gradient_reversal(jnp.concatenate([fs, ft], axis=0), lam))
        ns = zs.shape[0]
        return mdd_loss(zs, adv[:ns], zt, adv[ns:], margin=self.margin), {"train/da/lambda": lam}


class TwoViews:
    """grain random map over a target batch: ``image`` -> weak view ``image`` + strong view ``strong_image``."""

    def __init__(self, weak: Any, strong: Any):
        self.weak, self.strong = weak, strong

    def __call__(self, batch: dict, rng) -> dict:
        base = {"image": batch["image"]}
        weak = self.weak.on_batch(base, rng if self.weak.is_random else None)["image"]
        strong = self.strong.on_batch(base, rng if self.strong.is_random else None)["image"]
        return {"image": weak, "strong_image": strong}


def merge_views(pair: tuple[dict, dict]) -> dict:
    """``(source batch, target views)`` -> one batch with ``target_image`` / ``target_strong_image``."""
    source, target = pair
    return {**source, "target_image": target["image"], "target_strong_image": target["strong_image"]}


@register
class SelfTraining(_LogitDA):
    """FixMatch-style self-training on the unlabelled target (Sohn et al. 2020); see the module docstring."""

    name: ClassVar[str] = "self_training"
    defaults: ClassVar[dict] = target_defaults(threshold=0.95, weak_pp=[], strong_pp=[])

    def __init__(self, config: ml_collections.ConfigDict, model):
        super().__init__(config, model)
        self.threshold = _number(self.cfg, "threshold", self.where)
        if self.threshold > 1:
            raise ValueError(f"{self.where}.threshold must be in [0, 1], got {self.threshold!r}")
        from tl_jax.data import build_preprocess

        self.weak_pp = build_preprocess(list(self.cfg.weak_pp), where=f"{self.where}.weak_pp")
        self.strong_pp = build_preprocess(list(self.cfg.strong_pp), where=f"{self.where}.strong_pp")

    def train_dataset(self, standard, *, batch_size, seed, process_index, process_count) -> grain.MapDataset:
        """``standard`` zipped with target batches in two views (random draws seeded by ``seed + 2``)."""
        from tl_jax.data import build_preprocess, train_dataset

        pp = build_preprocess(list(self.cfg.target_pp), where=f"{self.where}.target_pp")
        target = train_dataset(self._target_split(self.cfg.target_split), pp,
                               batch_size=self.cfg.target_batch_size or batch_size, seed=seed + 1,
                               process_index=process_index, process_count=process_count)
        target = target.random_map(TwoViews(self.weak_pp, self.strong_pp), seed=seed + 2)
        first = target[0]
        s_shape = standard[0]["image"].shape[1:]
        for key, name in (("image", "weak_pp"), ("strong_image", "strong_pp")):
            if first[key].shape[1:] != s_shape:
                raise ValueError(f"{self.where}.target_pp + {name} give target images of shape "
                                 f"{first[key].shape[1:]}, the source images (config.data.train_pp) are {s_shape}")
        n = min(len(standard), len(target))
        return grain.experimental.ZipMapDataset([standard[:n], target[:n]]).map(merge_views)

    def images(self, batch):
        if "target_strong_image" not in batch:
            raise KeyError(f"{self.name}: the batch has no 'target_strong_image' (keys {sorted(batch)}); "
                           f"train batches come from SelfTraining.train_dataset")
        return super().images(batch) + [batch["target_strong_image"]]

    def term(self, params, aux, zs, fs, zt, ft, extra_logits, step):
        loss, parts = fixmatch_loss(zt, extra_logits, threshold=self.threshold)
        return loss, {"train/da/mask_rate": parts["mask_rate"]}
