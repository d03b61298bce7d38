"""FixMatch-style self-training on the unlabelled target (Sohn et al. NeurIPS 2020): ``self_training``.

On top of :mod:`tl_jax.objectives.domain_adaptation`::

    L = CE + w·(1/B_t) Σ_b [max p^weak_b ≥ τ]·CE(z^strong_b, argmax p^weak_b)

Every unlabelled target example is preprocessed by ``target_pp`` and then
twice in the data pipeline, by the ops ``weak_pp`` and by ``strong_pp`` (lists
of the ordinary preprocessing ops, e.g. weak = a 1-pixel ``random_crop``,
strong = a 3-pixel ``random_crop`` + ``flip_lr``), into ``target_image`` (weak)
and ``target_strong_image``; the draws come from grain's per-index
``random_map`` rng, so batches depend only on the seed and the position (exact
resume). The pseudo-labels come from the weak view (gradient-stopped);
``threshold`` τ. Logged besides the shared metrics: ``train/da/mask_rate``.
"""
from __future__ import annotations

from typing import Any, ClassVar

import grain
import jax
import jax.numpy as jnp
import ml_collections

from tl_jax.data import build_preprocess
from tl_jax.objectives._checks import check_2d, check_scalar, config_number
from tl_jax.objectives.base import register
from tl_jax.objectives.classification import cross_entropy
from tl_jax.objectives.domain_adaptation import UnsupervisedDA, target_defaults


def fixmatch_loss(weak_logits: jax.Array, strong_logits: jax.Array, *, threshold: float = 0.95
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """FixMatch-style pseudo-label loss on unlabelled data (Sohn et al. NeurIPS 2020).

    p_b = softmax(z^weak_b) (gradient-stopped), ŷ_b = argmax p_b, m_b = [max_c p_bc ≥ τ]::

        L = (1/B) Σ_b m_b · CE(z^strong_b, ŷ_b)

    (mean over ALL B examples, masked ones contributing 0, as in the paper).

    Args:
      weak_logits, strong_logits: [B, C] logits of the weakly / strongly augmented views.
      threshold: τ ∈ [0, 1].

    Returns:
      ``(L, {'mask_rate': mean m, 'pseudo_labels': ŷ [B]})``.
    """
    check_2d("weak_logits", weak_logits)
    check_2d("strong_logits", strong_logits)
    if jnp.shape(weak_logits) != jnp.shape(strong_logits):
        raise ValueError(f"strong_logits must have the shape of weak_logits {jnp.shape(weak_logits)}, "
                         f"got {jnp.shape(strong_logits)}")
    check_scalar("threshold", threshold, low=0.0, high=1.0)
    p = jax.nn.softmax(jax.lax.stop_gradient(weak_logits).astype(jnp.float32), axis=-1)
    pseudo = jnp.argmax(p, axis=-1)
    mask = (jnp.max(p, axis=-1) >= threshold).astype(jnp.float32)
    loss = jnp.mean(mask * cross_entropy(strong_logits, pseudo))
    return loss, {"mask_rate": jnp.mean(mask), "pseudo_labels": pseudo}


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
class SelfTraining(UnsupervisedDA):
    """FixMatch-style self-training on the unlabelled target (Sohn et al. 2020); see the module docstring."""

    name: ClassVar[str] = "self_training"
    defaults: ClassVar[dict] = target_defaults(threshold=0.95, weak_pp=[], strong_pp=[])

    def __init__(self, config: ml_collections.ConfigDict, model):
        super().__init__(config, model)
        self.threshold = config_number(f"{self.where}.threshold", self.cfg.threshold)
        if self.threshold > 1:
            raise ValueError(f"{self.where}.threshold must be in [0, 1], got {self.threshold!r}")
        self.weak_pp = build_preprocess(list(self.cfg.weak_pp), where=f"{self.where}.weak_pp")
        self.strong_pp = build_preprocess(list(self.cfg.strong_pp), where=f"{self.where}.strong_pp")

    def train_dataset(self, standard, *, batch_size, seed, process_index, process_count) -> grain.MapDataset:
        """``standard`` zipped with target batches in two views (random draws seeded by ``seed + 2``)."""
        target = self.target_batches(batch_size=batch_size, seed=seed, process_index=process_index,
                                     process_count=process_count)
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
