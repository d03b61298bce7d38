"""Per-example preprocessing built from a config list of op dicts (numpy / PIL).

Example config (``config.data.pp``)::

    [{"op": "rescale", "in_max": 16}, {"op": "resize", "size": 20},
     {"op": "pad", "size": 28}, {"op": "normalize", "mean": 0.1307, "std": 0.3081}]

``build_preprocess(ops)`` validates the list once and returns a ``Preprocess``:
a picklable callable ``(example, rng=None) -> {"image": float32 [H, W, C],
"label": int32 scalar}``. The input image (any dtype, HxWxC or HxW) is first cast
to float32; ops then run in list order. Random ops draw from ``rng`` in list order,
so a fixed ``np.random.Generator`` state gives a fixed output.

Ops (``size`` is an int for a square or ``[h, w]``):

==================  =====================================================  ======
op                  semantics                                              random
==================  =====================================================  ======
rescale(in_max)     ``x / in_max`` (e.g. 255 for uint8 images -> [0, 1])    no
resize(size)        bilinear, per channel via PIL mode 'F' (half-pixel      no
                    centres; antialiased when shrinking)
pad(size)           zero-pad to ``size``, image centred (extra row/col at   no
                    bottom/right); error if the image is larger
normalize(mean,     ``(x - mean) / std``; scalars or per-channel lists      no
std)
center_crop(size)   crop at offset ``(H - h) // 2, (W - w) // 2``           no
random_crop(size,   zero-pad ``pad`` on every side, then crop at a uniform  yes
pad=0)              random offset
flip_lr(p=0.5)      mirror the width axis with probability ``p``            yes
to_rgb()            1 channel -> 3 by repetition (3 channels: unchanged)    no
to_gray()           3 channels -> 1 by mean (1 channel: unchanged)          no
==================  =====================================================  ======
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

Shape = tuple[int, int, int]
_BILINEAR = Image.Resampling.BILINEAR


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


# --- ops: each is (image float32 [H, W, C], rng, **params) -> image -------------


def _rescale(x: np.ndarray, rng, *, in_max: float) -> np.ndarray:
    return x / np.float32(in_max)


def _resize(x: np.ndarray, rng, *, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if x.shape[:2] == (h, w):
        return x
    chans = [
        np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c])).resize((w, h), _BILINEAR))
        for c in range(x.shape[-1])
    ]
    return np.stack(chans, axis=-1).astype(np.float32, copy=False)


def _pad_to(x: np.ndarray, h: int, w: int, what: str) -> np.ndarray:
    ih, iw = x.shape[:2]
    if ih > h or iw > w:
        raise ValueError(f"{what}: image {ih}x{iw} is larger than pad size {h}x{w}")
    top, left = (h - ih) // 2, (w - iw) // 2
    return np.pad(x, ((top, h - ih - top), (left, w - iw - left), (0, 0)))


def _pad(x: np.ndarray, rng, *, size: tuple[int, int]) -> np.ndarray:
    return _pad_to(x, *size, what="pad")


def _normalize(x: np.ndarray, rng, *, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return ((x - mean) / std).astype(np.float32, copy=False)


def _crop_at(x: np.ndarray, top: int, left: int, h: int, w: int, what: str) -> np.ndarray:
    ih, iw = x.shape[:2]
    if h > ih or w > iw:
        raise ValueError(f"{what}: crop {h}x{w} is larger than image {ih}x{iw}")
    return x[top : top + h, left : left + w]


def _center_crop(x: np.ndarray, rng, *, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    return _crop_at(x, (x.shape[0] - h) // 2, (x.shape[1] - w) // 2, h, w, "center_crop")


def _random_crop(x: np.ndarray, rng, *, size: tuple[int, int], pad: int) -> np.ndarray:
    h, w = size
    ih, iw = x.shape[0] + 2 * pad, x.shape[1] + 2 * pad  # the zero-padded image, never built
    if h > ih or w > iw:
        raise ValueError(f"random_crop: crop {h}x{w} is larger than image {ih}x{iw}")
    top = int(rng.integers(0, ih - h + 1))
    left = int(rng.integers(0, iw - w + 1))
    if not pad:
        return x[top : top + h, left : left + w]
    # = np.pad(x, pad)[top : top + h, left : left + w], copying only the rows/cols of x inside the crop
    out = np.zeros((h, w, x.shape[2]), x.dtype)
    r0, c0 = top - pad, left - pad  # crop origin in x's coordinates
    rows = slice(max(r0, 0), min(r0 + h, x.shape[0]))
    cols = slice(max(c0, 0), min(c0 + w, x.shape[1]))
    if rows.stop > rows.start and cols.stop > cols.start:
        out[rows.start - r0 : rows.stop - r0, cols.start - c0 : cols.stop - c0] = x[rows, cols]
    return out


def _flip_lr(x: np.ndarray, rng, *, p: float) -> np.ndarray:
    return x[:, ::-1] if rng.random() < p else x


def _to_rgb(x: np.ndarray, rng) -> np.ndarray:
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def _to_gray(x: np.ndarray, rng) -> np.ndarray:
    return x.mean(axis=-1, keepdims=True, dtype=np.float32) if x.shape[-1] == 3 else x


@dataclasses.dataclass(frozen=True)
class _OpDef:
    fn: Callable[..., np.ndarray]
    required: tuple[str, ...]
    optional: dict[str, Any]
    parse: dict[str, Callable[[Any], Any]]
    random: bool = False


_OPS: dict[str, _OpDef] = {
    "rescale": _OpDef(
        _rescale, ("in_max",), {}, {"in_max": lambda v: _number(v, "in_max", positive=True)}
    ),
    "resize": _OpDef(_resize, ("size",), {}, {"size": _hw}),
    "pad": _OpDef(_pad, ("size",), {}, {"size": _hw}),
    "normalize": _OpDef(
        _normalize,
        ("mean", "std"),
        {},
        {"mean": lambda v: _vector(v, "mean"), "std": lambda v: _vector(v, "std", positive=True)},
    ),
    "center_crop": _OpDef(_center_crop, ("size",), {}, {"size": _hw}),
    "random_crop": _OpDef(
        _random_crop,
        ("size",),
        {"pad": 0},
        {"size": _hw, "pad": lambda v: _nonneg_int(v, "pad")},
        random=True,
    ),
    "flip_lr": _OpDef(
        _flip_lr,
        (),
        {"p": 0.5},
        {"p": lambda v: _probability(v, "p")},
        random=True,
    ),
    "to_rgb": _OpDef(_to_rgb, (), {}, {}),
    "to_gray": _OpDef(_to_gray, (), {}, {}),
}
RANDOM_OPS = tuple(name for name, d in _OPS.items() if d.random)


@dataclasses.dataclass(frozen=True)
class _Op:
    name: str
    fn: Callable[..., np.ndarray]
    params: dict[str, Any]
    random: bool
    where: str


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Validated op chain. ``pp(example, rng)`` -> ``{"image": f32 HxWxC, "label": i32}``.

    An example without ``image`` (token ids: ``input_ids``, ``attention_mask``)
    passes through as int32 arrays; it accepts only the empty op list.

    ``example`` needs ``image`` (HxWxC or HxW, any numeric dtype) and ``label``.
    ``rng`` (``np.random.Generator``) is required iff ``is_random``; grain's
    ``random_map`` passes one per element. Picklable (module-level functions only).
    """

    ops: tuple[_Op, ...]
    where: str = "config.data.pp"

    @property
    def is_random(self) -> bool:
        """True if any op draws from the rng (random_crop, flip_lr)."""
        return any(op.random for op in self.ops)

    @property
    def op_names(self) -> tuple[str, ...]:
        return tuple(op.name for op in self.ops)

    def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict:
        if rng is None and self.is_random:
            raise ValueError(f"{self.where} has random ops {RANDOM_OPS}: pass an rng")
        if "image" not in example:
            return self._tokens(example)
        image = np.asarray(example["image"], dtype=np.float32)
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3:
            raise ValueError(f"{self.where}: expected an HxWxC image, got shape {image.shape}")
        for op in self.ops:
            try:
                image = op.fn(image, rng, **op.params)
            except ValueError as e:
                raise ValueError(f"{op.where} (op {op.name!r}): {e}") from None
        return {
            "image": np.ascontiguousarray(image, dtype=np.float32),
            "label": np.int32(example["label"]),
        }

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
        built.append(_Op(name, d.fn, params, d.random, at))
    return Preprocess(tuple(built), where)
