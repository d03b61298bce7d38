"""Read a flat ``{name: numpy array}`` of tensors from a weights file.

Formats: ``safetensors`` (``.safetensors``), ``torch`` (a PyTorch ``state_dict``
saved with ``torch.save``: ``.pt``, ``.pth``, ``.bin``, ``.ckpt``; needs
``torch``, read with ``weights_only=True``) and ``npz`` (``numpy.savez``).
Names are kept as stored (``layer1.0.conv1.weight``); bfloat16 tensors are
read as float32.
"""
from __future__ import annotations

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


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable .safetensors file ({e})") from None
    except (TypeError, ValueError):  # a dtype numpy lacks (bfloat16): read through jax
        from safetensors import safe_open

        with safe_open(str(path), framework="flax") as f:
            return {k: np.asarray(f.get_tensor(k), dtype=np.float32) for k in f.keys()}


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
