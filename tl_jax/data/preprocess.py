"""Preprocessing built from a config list of op dicts (numpy / PIL), per example or per batch.

Example config (``config.data.pp``)::

    [{"op": "rescale", "in_max": 16}, {"op": "resize", "size": 20},
     {"op": "pad", "size": 28}, {"op": "normalize", "mean": 0.1307, "std": 0.3081}]

``build_preprocess(ops)`` validates the list once and returns a ``Preprocess``:
a picklable callable ``(example, rng=None) -> {"image": float32 [H, W, C],
"label": int32 scalar}``, with ``on_batch(batch, rng=None)`` for a whole batch.
The input image (any dtype, HxWxC or HxW) is first cast to float32; ops then
run in list order, each over the whole batch at once. Random ops draw every
example's values for the batch from ``rng``, in list order, so a fixed
``np.random.Generator`` state gives a fixed output. The training chain runs the
ops before the first random op per example (or once, cached: tl_jax.data.cache)
and the rest per batch (:func:`tl_jax.data.shuffle.train_chain`).

Ops (``size`` is an int for a square or ``[h, w]``):

==================  =====================================================  ======
op                  semantics                                              random
==================  =====================================================  ======
rescale(in_max)     ``x · (1/in_max)`` (e.g. 255: uint8 images -> [0, 1])   no
resize(size)        bilinear, per channel via PIL mode 'F' (half-pixel      no
                    centres; antialiased when shrinking)
pad(size)           zero-pad to ``size``, image centred (extra row/col at   no
                    bottom/right); error if the image is larger
normalize(mean,     ``(x - mean) · (1/std)``; scalars or per-channel lists  no
std)
center_crop(size)   crop at offset ``(H - h) // 2, (W - w) // 2``           no
random_crop(size,   zero-pad ``pad`` on every side, then crop at a uniform  yes
pad=0)              random offset
flip_lr(p=0.5)      mirror the width axis with probability ``p``            yes
to_rgb()            1 channel -> 3 by repetition (3 channels: unchanged)    no
to_gray()           3 channels -> 1 by mean (1 channel: unchanged)          no
inception_crop(     random area/aspect box, resized to ``size``             yes
size, area, aspect) (:mod:`tl_jax.data.augment`)
random_erasing(p,   a random box set to ``value`` with probability ``p``    yes
area, aspect, value)
color_jitter(...)   brightness, contrast, saturation, hue factors           yes
randaugment(num_ops RandAugment's 14 ops (:mod:`tl_jax.data.randaugment`)   yes
magnitude, ...)
==================  =====================================================  ======

docs/data.md lists the strong augmentation ops' parameters and defaults.

The ops themselves (numpy over a batch) are in :mod:`tl_jax.data.image_ops`;
this module parses and checks the config and runs the chain.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tl_jax.data import augment, image_ops, randaugment

Shape = tuple[int, int, int]


def _hw(size: Any) -> tuple[int, int]:
    """Returns ``(h, w)`` from an int or a 2-sequence; raises ValueError otherwise."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        hw = (int(size), int(size))
    elif (
        isinstance(size, Sequence)
        and len(size) == 2
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size)
    ):
        hw = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"size must be an int or [h, w], got {size!r}")
    if min(hw) <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return hw


def _number(value: Any, what: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{what} must be > 0, got {value!r}")
    return float(value)


def _nonneg_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{what} must be an int >= 0, got {value!r}")
    return int(value)


def _probability(value: Any, what: str) -> float:
    p = _number(value, what)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {value!r}")
    return p


def _vector(value: Any, what: str, *, positive: bool = False) -> np.ndarray:
    """A scalar or per-channel list as a float32 array of shape () or [C]."""
    values = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    arr = np.asarray([_number(v, what, positive=positive) for v in values], np.float32)
    return arr.reshape(()) if not isinstance(value, Sequence) else arr


def _range(value: Any, what: str, *, high: float | None = None) -> tuple[float, float]:
    """``[lo, hi]`` with ``0 < lo <= hi`` (and ``hi <= high``) as a float pair."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{what} must be [lo, hi], got {value!r}")
    lo, hi = (_number(v, what, positive=True) for v in value)
    if lo > hi or (high is not None and hi > high):
        bound = f" <= {high}" if high is not None else ""
        raise ValueError(f"{what} must be [lo, hi] with 0 < lo <= hi{bound}, got {value!r}")
    return lo, hi


def _bounded(value: Any, what: str, low: float, high: float) -> float:
    v = _number(value, what)
    if not low <= v <= high:
        raise ValueError(f"{what} must be in [{low}, {high}], got {value!r}")
    return v


def _fill(value: Any) -> int:
    v = _nonneg_int(value, "fill")
    if v > 255:
        raise ValueError(f"fill must be an int in 0..255 (8-bit level), got {value!r}")
    return v


@dataclasses.dataclass(frozen=True)
class _OpDef:
    fn: Callable[..., np.ndarray]
    required: tuple[str, ...]
    optional: dict[str, Any]
    parse: dict[str, Callable[[Any], Any]]
    draw: Callable[..., tuple[np.ndarray, ...]] | None = None  # random ops only


_OPS: dict[str, _OpDef] = {
    "rescale": _OpDef(
        image_ops.rescale, ("in_max",), {}, {"in_max": lambda v: _number(v, "in_max", positive=True)}
    ),
    "resize": _OpDef(image_ops.resize, ("size",), {}, {"size": _hw}),
    "pad": _OpDef(image_ops.pad, ("size",), {}, {"size": _hw}),
    "normalize": _OpDef(
        image_ops.normalize,
        ("mean", "std"),
        {},
        {"mean": lambda v: _vector(v, "mean"), "std": lambda v: _vector(v, "std", positive=True)},
    ),
    "center_crop": _OpDef(image_ops.center_crop, ("size",), {}, {"size": _hw}),
    "random_crop": _OpDef(
        image_ops.random_crop,
        ("size",),
        {"pad": 0},
        {"size": _hw, "pad": lambda v: _nonneg_int(v, "pad")},
        draw=image_ops.draw_crop,
    ),
    "flip_lr": _OpDef(
        image_ops.flip_lr,
        (),
        {"p": 0.5},
        {"p": lambda v: _probability(v, "p")},
        draw=image_ops.draw_flip,
    ),
    "inception_crop": _OpDef(
        augment.inception_crop, ("size",), {"area": (0.05, 1.0), "aspect": (0.75, 4 / 3)},
        {"size": _hw, "area": lambda v: _range(v, "area", high=1.0), "aspect": lambda v: _range(v, "aspect")},
        draw=augment.draw_inception_crop,
    ),
    "random_erasing": _OpDef(
        augment.random_erasing, (), {"p": 0.25, "area": (0.02, 1 / 3), "aspect": (0.3, 1 / 0.3), "value": 0.0},
        {"p": lambda v: _probability(v, "p"), "area": lambda v: _range(v, "area", high=1.0),
         "aspect": lambda v: _range(v, "aspect"), "value": lambda v: _number(v, "value")},
        draw=augment.draw_random_erasing,
    ),
    "color_jitter": _OpDef(
        augment.color_jitter, (), {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0, "in_max": 1.0},
        {"brightness": lambda v: _bounded(v, "brightness", 0.0, 1e6),
         "contrast": lambda v: _bounded(v, "contrast", 0.0, 1e6),
         "saturation": lambda v: _bounded(v, "saturation", 0.0, 1e6),
         "hue": lambda v: _bounded(v, "hue", 0.0, 0.5), "in_max": lambda v: _number(v, "in_max", positive=True)},
        draw=augment.draw_color_jitter,
    ),
    "randaugment": _OpDef(
        randaugment.randaugment, (), {"num_ops": 2, "magnitude": 9, "in_max": 255.0, "fill": 128},
        {"num_ops": lambda v: _nonneg_int(v, "num_ops"),
         "magnitude": lambda v: _bounded(v, "magnitude", 0.0, randaugment.MAX_MAGNITUDE),
         "in_max": lambda v: _number(v, "in_max", positive=True), "fill": _fill},
        draw=randaugment.draw_randaugment,
    ),
    "to_rgb": _OpDef(image_ops.to_rgb, (), {}, {}),
    "to_gray": _OpDef(image_ops.to_gray, (), {}, {}),
}
RANDOM_OPS = tuple(name for name, d in _OPS.items() if d.draw is not None)


@dataclasses.dataclass(frozen=True)
class _Op:
    name: str
    fn: Callable[..., np.ndarray]
    params: dict[str, Any]
    draw: Callable[..., tuple[np.ndarray, ...]] | None
    where: str

    @property
    def random(self) -> bool:
        return self.draw is not None


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Validated op chain, applied to one example or to a whole batch.

    * ``pp(example, rng=None) -> {"image": f32 [H, W, C], "label": i32}``: one
      example (``image`` HxWxC or HxW, any numeric dtype; cast to float32 first).
    * ``pp.on_batch(batch, rng=None) -> batch``: ``batch["image"]`` float32
      ``[B, H, W, C]``, or a list of ``B`` float32 ``[H_b, W_b, C]`` images of
      different sizes, becomes float32 ``[B, h, w, C]``; other keys pass through.
      Each op runs once over the stacked batch (one numpy call instead of ``B``);
      images of different sizes go op by op one at a time until they match.

    Random ops take every example's draws for the batch from ``rng`` in one
    call, op by op in list order (e.g. ``random_crop``: ``top ~ U{0..H+2pad-h}``
    then ``left``, both ``[B]``), so the output is a function of the rows and the
    rng state only; a single example is a batch of one. ``rng`` (a
    ``np.random.Generator``, or anything with its ``integers`` and ``random``)
    is required iff ``is_random``: the training chain
    (:func:`tl_jax.data.shuffle.train_chain`) passes a
    :class:`~tl_jax.data.stream_rng.StreamRng` of the batch's stream positions.

    An example without ``image`` (token ids: ``input_ids``, ``attention_mask``)
    passes through as int32 arrays; it accepts only the empty op list.
    Picklable (module-level functions only).
    """

    ops: tuple[_Op, ...]
    where: str = "config.data.pp"

    @property
    def is_random(self) -> bool:
        """True if any op draws from the rng (``RANDOM_OPS``)."""
        return any(op.random for op in self.ops)

    @property
    def op_names(self) -> tuple[str, ...]:
        return tuple(op.name for op in self.ops)

    def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict:
        self._check_rng(rng)
        if "image" not in example:
            return self._tokens(example)
        image = np.asarray(example["image"], dtype=np.float32)
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3:
            raise ValueError(f"{self.where}: expected an HxWxC image, got shape {image.shape}")
        return {"image": np.ascontiguousarray(self._apply(image[None], rng)[0]),
                "label": np.int32(example["label"])}

    def on_batch(self, batch: dict, rng: np.random.Generator | None = None) -> dict:
        """The chain over a batch (see the class docstring); ``image`` comes back stacked."""
        self._check_rng(rng)
        images = self._apply(batch["image"], rng)
        if isinstance(images, list):
            shapes = sorted({x.shape for x in images})
            raise ValueError(f"{self.where}: the images of a batch differ in shape after ops "
                             f"{list(self.op_names)} ({shapes[:4]}); end the chain with a fixed-size op "
                             "(resize, center_crop, random_crop, pad)")
        return {**batch, "image": np.ascontiguousarray(images, dtype=np.float32)}

    def split(self) -> tuple["Preprocess", "Preprocess"]:
        """``(prefix, suffix)``: the ops before the first random op, and the rest.

        ``suffix(prefix(example), rng) == self(example, rng)`` for every example
        and rng state: the prefix draws nothing, and every op maps float32
        images to float32 images.
        """
        first_random = next((i for i, op in enumerate(self.ops) if op.random), len(self.ops))
        return Preprocess(self.ops[:first_random], self.where), Preprocess(self.ops[first_random:], self.where)

    def _check_rng(self, rng: np.random.Generator | None) -> None:
        if rng is None and self.is_random:
            raise ValueError(f"{self.where} has random ops {[n for n in self.op_names if n in RANDOM_OPS]}: "
                             "pass an rng")

    def _apply(self, images: np.ndarray | list[np.ndarray], rng: np.random.Generator | None
               ) -> np.ndarray | list[np.ndarray]:
        """``images``: float32 ``[B, H, W, C]``, or a list of ``[H_b, W_b, C]`` (stacked once they match)."""
        for op in self.ops:
            try:
                draws = op.draw(rng, _sizes(images), **op.params) if op.random else ()
                if isinstance(images, np.ndarray):
                    images = op.fn(images, *draws, **op.params)
                else:
                    images = _stack_if_same([op.fn(x[None], *(d[b : b + 1] for d in draws), **op.params)[0]
                                             for b, x in enumerate(images)])
            except ValueError as e:
                raise ValueError(f"{op.where} (op {op.name!r}): {e}") from None
        return images

    def _tokens(self, example: dict) -> dict:
        """Text examples: every non-label array as int32 (token ids, masks); ops are image-only."""
        if self.ops:
            raise ValueError(
                f"{self.where}: ops {list(self.op_names)} need an 'image' but the examples hold "
                f"{sorted(k for k in example if k != 'label')}; use an empty op list [] for token ids"
            )
        out = {k: np.asarray(v, dtype=np.int32) for k, v in example.items() if k != "label"}
        return {**out, "label": np.int32(example["label"])}

    def output_shape(self, input_shape: Sequence[int]) -> Shape:
        """Image shape after the chain for an input ``(H, W, C)`` (or ``(H, W)``)."""
        shape = tuple(int(s) for s in input_shape)
        if len(shape) == 2:
            shape = (*shape, 1)
        dummy = {"image": np.zeros(shape, np.float32), "label": 0}
        return tuple(self(dummy, np.random.default_rng(0))["image"].shape)


def _sizes(images: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """``[B, 2]`` int array of every image's ``(H, W)``."""
    if isinstance(images, np.ndarray):
        return np.broadcast_to(np.asarray(images.shape[1:3]), (len(images), 2))
    return np.asarray([x.shape[:2] for x in images]).reshape(-1, 2)


def _stack_if_same(images: Sequence[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """``np.stack(images)`` if they share one shape, else the list."""
    return np.stack(images) if len({x.shape for x in images}) <= 1 else list(images)


def stack_examples(examples: Sequence[dict]) -> dict:
    """grain ``batch_fn`` of the training chain: stack every key; images of different
    sizes stay a list (for :meth:`Preprocess.on_batch` to bring to one size)."""
    out = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != "image"}
    if "image" in examples[0]:
        out["image"] = _stack_if_same([e["image"] for e in examples])
    return out


def build_preprocess(ops: Sequence[dict] | None, *, where: str = "config.data.pp") -> Preprocess:
    """Validates ``ops`` (list of ``{"op": name, **params}``) into a ``Preprocess``.

    ``None`` / ``[]`` gives the identity (cast to float32 HxWxC). Errors name
    ``where[i]``, the op, and the known ops or accepted kwargs.
    """
    if ops is None:
        ops = []
    if isinstance(ops, (str, bytes, dict)) or not isinstance(ops, Sequence):
        raise ValueError(f"{where} must be a list of op dicts, got {type(ops).__name__}")
    built = []
    for i, spec in enumerate(ops):
        at = f"{where}[{i}]"
        if hasattr(spec, "to_dict"):  # ml_collections.ConfigDict
            spec = spec.to_dict()
        if not isinstance(spec, dict) or "op" not in spec:
            raise ValueError(f"{at} must be a dict with an 'op' key, got {spec!r}")
        name = spec["op"]
        if name not in _OPS:
            raise ValueError(f"{at}: unknown op {name!r}; known ops: {sorted(_OPS)}")
        d = _OPS[name]
        kwargs = {k: v for k, v in spec.items() if k != "op"}
        accepted = [*d.required, *d.optional]
        unexpected = sorted(set(kwargs) - set(accepted))
        missing = [k for k in d.required if k not in kwargs]
        if unexpected or missing:
            problem = (
                f"unexpected kwargs {unexpected}" if unexpected else (f"missing kwargs {missing}")
            )
            raise ValueError(
                f"{at} (op {name!r}): {problem}; accepted kwargs: {accepted or 'none'}"
            )
        params = {**d.optional, **kwargs}
        try:
            params = {k: d.parse[k](v) for k, v in params.items()}
        except ValueError as e:
            raise ValueError(f"{at} (op {name!r}): {e}") from None
        built.append(_Op(name, d.fn, params, d.draw, at))
    return Preprocess(tuple(built), where)
