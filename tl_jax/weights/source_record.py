"""What a converted checkpoint came from, written beside it (timm / Hugging Face ConvNeXt / open_clip / big_vision).

:func:`write_converted` writes a :class:`~tl_jax.weights.convert.Converted` to
``out/state`` and ``out/tl_jax_weights.json`` with, besides the model name and
kwargs that ``init_from`` / ``tl-jax rank`` read::

    "source": "/abs/path/given", "format": "timm" | "huggingface" | "open_clip" | "big_vision",
    "architecture": "convnext_tiny" | "ConvNextModel" | ..., "mapping": "timm_convnext",
    "files": [{"name": "model.safetensors", "sha256": "..."}],
    "preprocessing": {"mean": [...], "std": [...], "image_size": [h, w], "resize": int | null,
                      "interpolation": "bicubic", "source": "config.json" | "defaults of ..."}

``preprocessing`` has the keys of :mod:`tl_jax.weights.hf_preprocessing` (the
Hugging Face ViT import writes the same): pixels in [0, 1] are normalised
``(x - mean) / std``; ``resize`` is the shorter-edge resize before a centre crop
to ``image_size`` (null: no crop).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import pathlib
from collections.abc import Sequence

from tl_jax.weights.convert import META_FILE, Converted, save_variables

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                "open_clip_pytorch_model.bin")
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def sha256(path: pathlib.Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_and_hash(out: pathlib.Path, variables: dict, files: Sequence[pathlib.Path], *,
                  overwrite: bool = False) -> list[dict]:
    """:func:`~tl_jax.weights.convert.save_variables` to ``out`` while a thread hashes ``files``; returns
    ``[{"name", "sha256"}]``. hashlib releases the GIL on large blocks and the checkpoint is written by
    tensorstore's own threads, so the record costs little wall time beyond the write."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        hashes = [pool.submit(sha256, pathlib.Path(f)) for f in files]
        save_variables(out, variables, overwrite=overwrite)
        return [{"name": pathlib.Path(f).name, "sha256": h.result()} for f, h in zip(files, hashes)]


def find_weight_file(path: pathlib.Path) -> pathlib.Path:
    """``path`` itself if a file, else the first of :data:`WEIGHT_FILES` in the folder (one-line error if none)."""
    if path.is_file():
        return path
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path}: no weights file; expected one of {list(WEIGHT_FILES)} in the folder")


def image_preprocessing(mean: Sequence[float] | None, std: Sequence[float] | None, size: int | Sequence[int],
                        crop_pct: float | None, interpolation: str, source: str) -> dict:
    """The ``preprocessing`` record (module doc) of an eval transform: resize to ``size / crop_pct``, crop ``size``.

    ``crop_pct`` None or 1: resize straight to ``size`` (``resize`` null). The shorter-edge resize is
    ``floor(size / crop_pct)``, as timm's and Hugging Face's eval transforms compute it.
    """
    hw = [int(size), int(size)] if isinstance(size, (int, float)) else [int(s) for s in size]
    resize = None if not crop_pct or crop_pct >= 1.0 else int(math.floor(min(hw) / crop_pct))
    return {"mean": [float(v) for v in (mean or IMAGENET[0])], "std": [float(v) for v in (std or IMAGENET[1])],
            "image_size": hw, "resize": resize, "interpolation": interpolation, "source": source}


def write_converted(result: Converted, out: str | pathlib.Path | None, *, source: pathlib.Path, fmt: str,
                    architecture: str | None, mapping: str, files: Sequence[pathlib.Path],
                    preprocessing: dict | None, overwrite: bool = False) -> Converted:
    """Saves ``result`` to ``out`` with the record of the module doc; ``out=None``: returns ``result`` unwritten."""
    if out is None:
        return result
    out = pathlib.Path(out).absolute()
    hashes = save_and_hash(out, result.variables, files, overwrite=overwrite)
    meta = {"source": str(pathlib.Path(source).absolute()), "format": fmt, "architecture": architecture,
            "files": hashes, "mapping": mapping,
            "model": result.model, "num_classes": result.num_classes,
            "has_head": "head" in result.variables.get("params", {}), "model_kwargs": result.model_kwargs,
            "dropped": list(result.dropped), "preprocessing": preprocessing}
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return dataclasses.replace(result, out=out)
