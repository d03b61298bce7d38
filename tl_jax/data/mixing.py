"""Batch-level mixup and cutmix with soft labels: ``config.data.mixup`` (off by default).

Each training batch (after the preprocessing) pairs example ``b`` with its
partner ``B - 1 - b`` (the batch reversed, as timm) and, with probability
``prob``, mixes them (per example, timm's ``elem`` mode). A multi-domain batch
(a ``domain`` key, the ``multidomain`` objective's) is mixed per domain: the
partner is taken within the example's own domain (that domain's examples in
batch order, reversed: :func:`partners`), so a mixed example stays in its
domain and the loss's per-domain weighting still applies:

* mixup (``alpha > 0``): ``x = λ x_b + (1 − λ) x_partner``, ``λ ~ Beta(alpha, alpha)``;
* cutmix (``cutmix_alpha > 0``): the partner's pixels in a box of side
  ``sqrt(1 − λ)`` of the image's (timm's ``rand_bbox``: centre uniform, clipped to the
  image), ``λ ~ Beta(cutmix_alpha, cutmix_alpha)``, then ``λ = 1 − box area / (H W)``;
* both on: cutmix with probability ``switch_prob``, else mixup.

The batch gains ``label_soft`` float32 ``[B, C]`` ``= λ onehot(y_b) + (1 − λ)
onehot(y_partner)`` (``λ = 1`` where not mixed); ``label`` stays the example's
own class (train accuracy). A batch with task labels ``label/<task>`` (the
``joint`` objective's) also gains ``mix_lam`` float32 ``[B]`` and each partner's
task labels ``partner_label/<task>``: the joint loss takes ``λ CE(z, y) + (1 − λ)
CE(z, y_partner)`` per task, which is the soft cross-entropy of the mixed one-hots
(CE and label smoothing are linear in the target), without a ``[B, C]`` array per task. The classification loss uses it as the target
(:func:`tl_jax.objectives.classification.soft_cross_entropy`, label smoothing
then applied on top: ``q = (1 − ε) t + ε / C``, timm's ``mixup_target``).

The draws come from a :class:`~tl_jax.data.stream_rng.StreamRng` of the batch's
positions ``kB .. kB+B-1`` under the data seed xor :data:`SALT` (a different
stream from the preprocessing's), so a run resumed from ``{"next_index": k}``
mixes the same way. ``λ`` is drawn by the Beta inverse CDF of a uniform.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import special

from tl_jax.data.stream_rng import StreamRng
from tl_jax.util import config_checks

SALT = 0x6D69787570  # 'mixup': the mixing draws are not the preprocessing's
KEYS = ("alpha", "cutmix_alpha", "switch_prob", "prob")
SOFT_LABEL_OBJECTIVES = ("classification", "multidomain", "joint")  # objectives whose loss reads the mixed targets
PARTNER = "partner_"  # batch[PARTNER + 'label/<task>']: each example's partner's task label (joint batches)


def is_on(mix: Any) -> bool:
    """True when ``config.data.mixup`` mixes anything (``alpha > 0`` or ``cutmix_alpha > 0``)."""
    return float(mix["alpha"]) > 0 or float(mix["cutmix_alpha"]) > 0


def draw_mix(rng, n: int, *, alpha: float, cutmix_alpha: float, switch_prob: float, prob: float):
    """``(lam float64 [n], cut bool [n])``: the Beta draw (1 where not mixed) and whether cutmix mixes."""
    u_apply, u_switch, u_lam = rng.random(n), rng.random(n), rng.random(n)
    apply = u_apply < prob
    if alpha > 0 and cutmix_alpha > 0:
        cut = u_switch < switch_prob
    else:
        cut = np.full(n, cutmix_alpha > 0)
    a = np.where(cut, cutmix_alpha, alpha)
    lam = special.betaincinv(np.where(a > 0, a, 1.0), np.where(a > 0, a, 1.0), u_lam)
    return np.where(apply, lam, 1.0), cut & apply


def draw_boxes(rng, lam: np.ndarray, height: int, width: int) -> np.ndarray:
    """int ``[n, 4]`` ``(top, bottom, left, right)`` of each cutmix box (timm's ``rand_bbox``).

    Side ratio ``r = sqrt(1 − λ)``, ``h = int(H r)``, ``w = int(W r)``, centre
    ``cy ~ U{0..H-1}``, ``cx ~ U{0..W-1}``, the box ``[cy − h//2, cy + h//2)``
    (same in x) clipped to the image.
    """
    u_y, u_x = rng.random(len(lam)), rng.random(len(lam))
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = (height * ratio).astype(np.int64), (width * ratio).astype(np.int64)
    cy, cx = np.floor(u_y * height).astype(np.int64), np.floor(u_x * width).astype(np.int64)
    return np.stack([np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height),
                     np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)], axis=1)


def partners(n: int, domain: np.ndarray | None = None) -> np.ndarray:
    """int ``[n]``: each example's mixing partner, the batch reversed (``n - 1 - b``), or with ``domain``
    ``[n]`` the reversal within each domain: the ``j``-th of a domain's ``k`` examples (batch order) pairs
    with its ``(k - 1 - j)``-th (one domain: the plain reversal; an example alone in its domain: itself)."""
    if domain is None:
        return np.arange(n)[::-1]
    domain, out = np.asarray(domain), np.empty(n, np.int64)
    for d in np.unique(domain):
        idx = np.flatnonzero(domain == d)
        out[idx] = idx[::-1]
    return out


def mix_batch(batch: dict, lam: np.ndarray, cut: np.ndarray, boxes: np.ndarray, num_classes: int) -> dict:
    """The mixed batch: ``image`` mixed with the partners' (per domain when it has ``domain``),
    ``label_soft`` [B, C] added (module doc)."""
    x, y = batch["image"], np.asarray(batch["label"])
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"config.data.mixup: labels must be in [0, {num_classes}), got {y.min()}..{y.max()}")
    partner = partners(len(x), batch.get("domain"))
    h, w = x.shape[1:3]
    rows, cols = np.arange(h), np.arange(w)
    inside = (((rows >= boxes[:, :1]) & (rows < boxes[:, 1:2]))[:, :, None]
              & ((cols >= boxes[:, 2:3]) & (cols < boxes[:, 3:]))[:, None, :] & cut[:, None, None])
    lam = np.where(cut, 1.0 - inside.sum((1, 2)) / (h * w), lam).astype(np.float32)
    blend = lam[:, None, None, None] * x + (1.0 - lam[:, None, None, None]) * x[partner]
    image = np.where(inside[..., None], x[partner], np.where(cut[:, None, None, None], x, blend))
    eye = np.eye(num_classes, dtype=np.float32)
    soft = lam[:, None] * eye[y] + (1.0 - lam[:, None]) * eye[y[partner]]
    tasks = {f"{PARTNER}{k}": np.asarray(v)[partner] for k, v in batch.items() if k.startswith("label/")}
    if tasks:  # the joint objective's task labels: λ and each partner's, for λ·CE(y) + (1 − λ)·CE(y_partner)
        tasks["mix_lam"] = lam
    return {**batch, "image": image.astype(np.float32, copy=False), "label_soft": soft, **tasks}


class Mixing:
    """``(k, batch) -> mix_batch(...)`` with the draws of batch ``k``'s positions (picklable, for grain)."""

    def __init__(self, mix: dict, *, batch_size: int, seed: int, num_classes: int):
        self.mix = {k: float(mix[k]) for k in KEYS}
        self.batch_size, self.seed, self.num_classes = int(batch_size), int(seed), int(num_classes)

    def __call__(self, index: int, batch: dict) -> dict:
        if np.ndim(batch.get("image")) != 4:
            raise ValueError(f"config.data.mixup mixes image batches [B, H, W, C]; this batch holds {sorted(batch)}: "
                             "set config.data.mixup.alpha=cutmix_alpha=0")
        start = int(index) * self.batch_size
        rng = StreamRng(self.seed ^ SALT, np.arange(start, start + len(batch["image"])))
        lam, cut = draw_mix(rng, len(batch["image"]), **self.mix)
        boxes = draw_boxes(rng, lam, *batch["image"].shape[1:3])
        return mix_batch(batch, lam, cut, boxes, self.num_classes)


def wrap(dataset: Any, mix: Any, *, batch_size: int, seed: int, num_classes: int) -> Any:
    """``dataset`` (a grain MapDataset of batches) mixed by ``config.data.mixup``, or as it is when off."""
    if not is_on(mix):
        return dataset
    return dataset.map_with_index(Mixing(dict(mix), batch_size=batch_size, seed=seed, num_classes=num_classes))


def check_config(config: Any) -> None:
    """``config.data.mixup``: its numbers in range, and only where the loss reads soft labels."""
    mix = config.data.mixup
    for key in ("alpha", "cutmix_alpha"):
        v = mix[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"config.data.mixup.{key} must be a number >= 0 (0 = off), got {v!r}")
    for key in ("switch_prob", "prob"):
        v = mix[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ValueError(f"config.data.mixup.{key} must be in [0, 1], got {v!r}")
    if not is_on(mix):
        return
    if config.objective.name not in SOFT_LABEL_OBJECTIVES:
        raise ValueError(f"config.data.mixup is on but config.objective.name={config.objective.name!r} does not "
                         f"read soft labels (only {list(SOFT_LABEL_OBJECTIVES)}); set alpha=cutmix_alpha=0")
    for key in ("train.feature_cache", "data.device_cache"):
        group, leaf = key.split(".")
        if config[group][leaf] is True:
            raise ValueError(f"config.data.mixup mixes the images of each batch on the host: set config.{key} to "
                             "false or 'auto'")


config_checks.register_check("mixup", check_config)  # run by tl_jax.config.validate
