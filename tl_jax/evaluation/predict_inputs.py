"""Inputs of ``tl-jax predict`` other than a prepared split: an image folder, a CSV of texts.

Each becomes an in-memory :class:`~tl_jax.data.sources.DataSplit` whose examples look
like the run's stored ones, so the run's ``config.data.eval_pp`` applies unchanged:

* **image folder**: every readable image is decoded like ``tl-jax data prepare``
  does (:func:`tl_jax.data.image_folder.load_image`: RGB or grayscale as the run's
  dataset, resized to its stored ``H x W`` by its resize policy, ``stretch`` unless
  the run's dataset was an image folder prepared with another). Layout: either
  images directly in the folder (unlabelled: label -1), or one sub-folder per
  class, each named like a class of the run (label = that class; images directly
  in the folder next to them are unlabelled). A sub-folder that is not a class of
  the run is refused (one line naming it and the run's classes): nothing is written.
* **CSV**: a header with a text column (``text``) and optionally a label column
  (``label``); texts are tokenised as ``tl-jax data prepare --csv`` did, with the
  tokenizer recorded in the run's dataset metadata (or ``--tokenizer``), to the
  run's token length. Labels must be class names of the run (else one-line error).
"""
from __future__ import annotations

import csv
import json
import logging
import pathlib
from typing import Any

import numpy as np

from tl_jax.data import sources
from tl_jax.data.image_folder import _files, _probe, _subdirs, _visible, load_image
from tl_jax.data.sources import DataSplit, load_split
from tl_jax.data.text_csv import load_tokenizer, tokenize
from tl_jax.data.user_datasets import find_user_dataset, read_user_builder

log = logging.getLogger("tl_jax")


class ListSource:
    """``source[i]`` over a list of example dicts (random access, like a tfds source)."""

    def __init__(self, examples: list[dict]):
        self._examples = examples

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> dict:
        return self._examples[int(index)]


def dataset_info(name: str, data_dir: str | None) -> tuple[list[str] | None, dict, tuple | None]:
    """``(class names, tl_jax metadata, stored input shape)`` of a dataset, as far as known."""
    meta: dict = {}
    try:
        if name in sources.EMBEDDED:
            builder = sources.prepare_embedded(name, data_dir)
        elif (user := find_user_dataset(name, data_dir)) is not None:
            builder = read_user_builder(user)
            meta = json.loads((user / "metadata.json").read_text()).get("tl_jax", {})
        else:
            import tensorflow_datasets as tfds

            builder = tfds.builder(name, data_dir=data_dir)
        features = builder.info.features
        keys = builder.info.supervised_keys
        image_key, label_key = keys if isinstance(keys, tuple) and len(keys) == 2 else ("image", "label")
        names = list(features[label_key].names) if label_key in features else None
        key = image_key if image_key in features else "input_ids"
        shape = tuple(features[key].shape) if key in features else None
    except Exception:  # noqa: BLE001 - names are a convenience; load_split reports real data errors
        return None, meta, None
    return names, meta, shape


def class_names(name: str, data_dir: str | None) -> list[str] | None:
    """Label names of a dataset (``None`` when unknown)."""
    return dataset_info(name, data_dir)[0]


def _image_files(folder: pathlib.Path) -> list[pathlib.Path]:
    return _files(folder)


def image_folder_split(folder: str, config: Any, names: list[str] | None
                       ) -> tuple[DataSplit, list[str], np.ndarray]:
    """``(split, paths, labels)`` of the images under ``folder`` (see module doc for the layout)."""
    root = pathlib.Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--image-folder {folder} does not exist (or is not a directory)")
    dc = config.data
    stored = load_split(dc.name, dc.train_split, dc.data_dir).image_shape
    if len(stored) != 3:
        raise ValueError(f"--image-folder: the run was trained on {dc.name} (token ids {stored}), not images")
    _, meta, _ = dataset_info(dc.name, dc.data_dir)
    resize = meta.get("resize") or "stretch"
    sub = _subdirs(root)
    unknown = [d.name for d in sub if names is None or d.name not in names]
    if unknown:
        raise ValueError(f"--image-folder {folder}: sub-folder(s) {unknown[:10]} are not classes of the run "
                         f"({names[:20] if names else 'its dataset has no class names'}); name sub-folders by "
                         f"class, or put unlabelled images directly in {folder}")
    candidates = [(f, -1) for f in sorted(root.iterdir()) if f.is_file() and _visible(f)]
    for d in sub:
        candidates += [(f, names.index(d.name)) for f in _image_files(d)]
    examples, paths, labels, skipped = [], [], [], []
    for f, label in candidates:
        if isinstance(_probe(f), str):
            skipped.append(str(f))
            continue
        image = load_image(f, stored[2], (stored[0], stored[1]), resize)
        examples.append({"image": image, "label": max(label, 0)})
        paths.append(str(f))
        labels.append(label)
    if skipped:
        log.warning("--image-folder: %d file(s) are not readable images, skipped: %s", len(skipped), skipped[:5])
    if not examples:
        raise ValueError(f"--image-folder {folder} holds no readable image")
    split = DataSplit("image_folder", str(root), ListSource(examples), len(names or []) or 1, tuple(stored))
    return split, paths, np.asarray(labels, np.int64)


def csv_split(path: str, config: Any, names: list[str] | None, tokenizer: str | None, text_column: str,
              label_column: str) -> tuple[DataSplit, list[str], np.ndarray | None]:
    """``(split, ids, labels or None)`` of a CSV of texts, tokenised like the run's dataset."""
    f = pathlib.Path(path).expanduser()
    if not f.is_file():
        raise FileNotFoundError(f"--csv {path} does not exist")
    dc = config.data
    _, meta, shape = dataset_info(dc.name, dc.data_dir)
    tok_path = tokenizer or meta.get("tokenizer")
    if not tok_path:
        raise ValueError(f"--csv: the run's dataset {dc.name!r} records no tokenizer (not a `tl-jax data prepare "
                         f"--csv` dataset); pass --tokenizer tokenizer.json")
    max_length = int(meta.get("max_length") or (shape[0] if shape else 0))
    with open(f, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        if text_column not in columns:
            raise ValueError(f"--csv {path}: no column {text_column!r} in the header (columns: {columns}); "
                             f"use --text-column")
        rows = list(reader)
    if not rows:
        raise ValueError(f"--csv {path} has no rows")
    labels = None
    if label_column in columns:
        unknown = sorted({r[label_column].strip() for r in rows} - set(names or []))
        if unknown:
            raise ValueError(f"--csv {path}: label(s) {unknown[:10]} are not classes of the run "
                             f"({(names or [])[:20]})")
        labels = np.asarray([names.index(r[label_column].strip()) for r in rows], np.int64)
    tok, _ = load_tokenizer(tok_path, max_length)
    ids, mask, _ = tokenize(tok, [r[text_column] or "" for r in rows])
    examples = [{"input_ids": ids[i], "attention_mask": mask[i], "label": 0 if labels is None else int(labels[i])}
                for i in range(len(rows))]
    split = DataSplit("csv", str(f), ListSource(examples), len(names or []) or 1, (max_length,))
    return split, [str(i) for i in range(len(rows))], labels
