"""Read a flat ``{name: numpy array}`` of tensors from a weights file.

Formats: ``safetensors`` (``.safetensors``), ``torch`` (a PyTorch ``state_dict``
saved with ``torch.save``: ``.pt``, ``.pth``, ``.bin``, ``.ckpt``; needs
``torch``, read with ``weights_only=True``) and ``npz`` (``numpy.savez``).
Names are kept as stored (``layer1.0.conv1.weight``); bfloat16 tensors are
read as float32.

A ``.safetensors`` file is memory-mapped, not copied: its arrays are read-only
views of the file (the format is a JSON header of names, dtypes, shapes and
byte offsets, then the raw little-endian data). A converter relayouts them
straight into its outputs, so a ViT-B/16's 344 MB are written once instead of
read into fresh memory and copied again (the copy into freshly faulted pages
was most of a first conversion's time). :func:`detached` copies what a result
keeps of them.
"""
from __future__ import annotations

import json
import pathlib
import pickle
from typing import Any

import numpy as np

FORMATS = ("safetensors", "torch", "npz")
_SUFFIXES = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch", ".ckpt": "torch",
             ".npz": "npz"}


def detect_format(path: str | pathlib.Path) -> str:
    """The format of ``path`` from its suffix (see module doc)."""
    suffix = pathlib.Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(f"cannot tell the format of {path} from its suffix; pass --format one of {list(FORMATS)}")
    return _SUFFIXES[suffix]


def read_tensors(path: str | pathlib.Path, fmt: str | None = None) -> dict[str, np.ndarray]:
    """``{name: array}`` of every tensor in ``path`` (format ``fmt`` or from the suffix)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown weights format {fmt!r}; known: {list(FORMATS)}")
    tensors = {"safetensors": _read_safetensors, "torch": _read_torch, "npz": _read_npz}[fmt](path)
    if not tensors:
        raise ValueError(f"{path} holds no tensors")
    return tensors


# safetensors dtype -> numpy (little-endian); BF16 (no numpy dtype) goes through safetensors' flax reader
_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                       "I8": "i1", "U8": "u1", "BOOL": "?"}


class _NoNumpyDtype(ValueError):
    """A tensor's safetensors dtype (``self.dtype``) is not in :data:`_SAFETENSORS_DTYPES`."""

    def __init__(self, name: str, dtype: str):
        super().__init__(f"tensor {name} has dtype {dtype}")
        self.dtype = dtype


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        return _map_safetensors(path)
    except _NoNumpyDtype as e:
        if e.dtype != "BF16":
            raise ValueError(f"{path} is not a readable .safetensors file ({e})") from None
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as e:  # ValueError: JSON's too
        raise ValueError(f"{path} is not a readable .safetensors file ({e})") from None
    from safetensors import safe_open  # bfloat16: read through jax, as float32

    with safe_open(str(path), framework="flax") as f:
        return {k: np.asarray(f.get_tensor(k), dtype=np.float32) for k in f.keys()}


def _map_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Read-only views of each tensor of the memory-mapped file (module doc), header checked."""
    raw = np.memmap(path, np.uint8, mode="r")
    if raw.size < 8:
        raise ValueError("shorter than its 8-byte header length")
    n = int(raw[:8].view("<u8")[0])
    if not 2 <= n <= raw.size - 8:
        raise ValueError(f"header length {n} does not fit the file's {raw.size} bytes")
    header, start = json.loads(bytes(raw[8:8 + n])), 8 + n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise _NoNumpyDtype(name, entry["dtype"])
        dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        shape = tuple(int(d) for d in entry["shape"])
        if not 0 <= begin <= end <= raw.size - start or end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise ValueError(f"tensor {name}: bytes {begin}..{end} do not hold {shape} {dtype}")
        out[name] = raw[start + begin:start + end].view(dtype).reshape(shape)
    return out


def detached(x: np.ndarray) -> np.ndarray:
    """``x``, or a copy of it where it is (a view of) a memory-mapped file: what a converter keeps must
    not change with, or hold open, its source file."""
    base = x
    while base is not None:
        if isinstance(base, np.memmap):
            return np.array(x, order="C")
        base = getattr(base, "base", None)
    return x


def _read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable .npz file ({e})") from None


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ValueError(f"reading the PyTorch file {path} needs torch: pip install torch==2.13.0 (CPU build)"
                         ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f"{path} is not a plain PyTorch state_dict (save model.state_dict(), not the model): "
                         f"{str(e).splitlines()[0][:200]}") from None
    obj = _unwrap(obj, path)
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        out[str(key)] = value.numpy()
    return out


def _unwrap(obj: Any, path: pathlib.Path) -> dict:
    """A training checkpoint ``{"state_dict": {...}, "epoch": 3}`` -> its state dict."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state_dict (dict of tensors)")
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj.get(key), dict) and not any(hasattr(v, "shape") for v in obj.values()):
            return obj[key]
    return obj
