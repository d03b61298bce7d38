"""Random-access splits: embedded builders (prepared on demand) or the tfds catalogue.

``load_split(name, split, data_dir)`` returns a ``DataSplit`` whose ``source`` is a
random-access sequence of ``{"image": HxWxC array, "label": int}`` dicts (images
as stored: uint8 for every image dataset here; 2-D images get a trailing
channel axis). No TensorFlow is needed: data is read from ``array_record`` files.

* Embedded names (``EMBEDDED``) are prepared into ``data_dir`` on first use. Two
  processes preparing the same ``data_dir`` at once are serialised by an
  exclusive ``fcntl`` lock on ``<data_dir>/.<name>.prepare.lock`` (POSIX only);
  the second one then finds the data prepared. tfds itself writes into an
  ``incomplete.*`` folder and renames it, so readers never see partial data.
* Names prepared by ``tl-jax data prepare`` (image folders, CSV text; see
  :mod:`tl_jax.data.user_datasets`) are found in ``data_dir`` and read with
  ``tfds.builder_from_directory``. Text examples are ``{"input_ids": int32 [L],
  "attention_mask": int32 [L], "label": int}`` instead of image ones.
* Any other name is read with ``tfds.data_source(..., download=False)``: it must
  already be prepared as ``array_record`` (``tfds build NAME
  --file_format=array_record --data_dir=DIR`` on a machine with internet).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tl_jax.data.builders import EMBEDDED
from tl_jax.data.in_memory import is_in_memory, load_in_memory
from tl_jax.data.split import DataSplit, wrap_index
from tl_jax.data.user_datasets import find_user_dataset, read_user_builder
from tl_jax.util.quiet import quiet_tfds

_RANDOM_ACCESS_FORMATS = ("array_record", "parquet")
_LABELS: dict[tuple, np.ndarray] = {}  # ExampleSource.read_labels: the files' identity -> their labels
_LABELS_KEPT = 32


class ExampleSource:
    """Wraps a tfds data source: ``src[i] -> {"image": HxWxC, "label": int}``.

    Indexes one element at a time (tfds sources' ``__getitems__`` is unusable
    without TensorFlow); drops every other feature (``id``, ...) except the
    integer ``label_fields`` asked for (e.g. cifar100's ``coarse_label``), kept
    as ``int`` under their own names (:meth:`with_label_fields`).
    """

    def __init__(self, data_source: Any, image_key: str = "image", label_key: str = "label",
                 text_keys: tuple[str, ...] = (), label_fields: tuple[str, ...] = ()):
        self._source = data_source
        self._len = len(data_source)
        self.image_key = image_key
        self.label_key = label_key
        self.text_keys = text_keys  # token datasets: these keys instead of "image"
        self.label_fields = tuple(label_fields)

    def with_label_fields(self, fields: tuple[str, ...], where: str = "label_fields") -> "ExampleSource":
        """This source also returning the integer features ``fields``; one-line ``ValueError``
        naming ``where`` and the first field the dataset lacks."""
        have = sorted(self._source[0].keys()) if self._len else []
        for key in fields:
            if key not in have:
                raise ValueError(f"{where}: the dataset has no feature {key!r}; it has {have}")
        return ExampleSource(self._source, self.image_key, self.label_key, self.text_keys, tuple(fields))

    def field_num_classes(self, key: str) -> int | None:
        """``num_classes`` of feature ``key`` when the tfds features declare it a ClassLabel, else None."""
        info = getattr(self._source, "dataset_info", None)
        features = getattr(info, "features", None)
        feature = features[key] if features is not None and key in features else None
        return getattr(feature, "num_classes", None) or None

    def __len__(self) -> int:
        return self._len

    def read_labels(self) -> np.ndarray:
        """Every example's ``label_key``, int64 (read-only): what :meth:`DataSplit.labels` returns.

        Reading them decodes every example (0.1-0.4 s for the embedded sets). A sweep task opens the
        same split for each of its points, so the labels of array_record files are kept for the process,
        keyed by the records read and each file's size, mtime and inode (files rewritten by ``tl-jax data
        prepare`` are read again)."""
        key = self._files_key()
        if key is not None and key in _LABELS:
            return _LABELS[key]
        labels = np.fromiter((int(self._source[i][self.label_key]) for i in range(self._len)), dtype=np.int64,
                             count=self._len)
        labels.flags.writeable = False
        if key is not None:
            while len(_LABELS) >= _LABELS_KEPT:
                del _LABELS[next(iter(_LABELS))]
            _LABELS[key] = labels
        return labels

    def _files_key(self) -> tuple | None:
        """The array_record records this source reads, with their files' identity; None for other sources
        (tfds mock data, parquet, in-memory)."""
        try:
            reads = self._source.data_source._read_instructions  # array_record's ArrayRecordDataSource
            files = []
            for r in reads:
                st = os.stat(r.filename)
                files.append((r.filename, r.start, r.end, st.st_size, st.st_mtime_ns, st.st_ino))
        except (AttributeError, OSError, TypeError):
            return None
        return (type(self._source.data_source).__name__, self.label_key, self._len, tuple(files)) if files else None

    def __getitem__(self, index: int) -> dict:
        example = self._source[wrap_index(index, self._len)]
        fields = {k: int(example[k]) for k in self.label_fields}
        if self.text_keys:  # {"input_ids": int [L], "attention_mask": int [L], "label": int}
            return {**{k: np.asarray(example[k]) for k in self.text_keys}, "label": int(example[self.label_key]),
                    **fields}
        image = np.asarray(example[self.image_key])
        if image.ndim == 2:
            image = image[..., None]
        return {"image": image, "label": int(example[self.label_key]), **fields}

    def __repr__(self) -> str:
        return f"ExampleSource(len={self._len}, source={type(self._source).__name__})"


def _split_names(split: str) -> list[str]:
    """Base split names of a tfds split spec: ``"train[:80%]+test"`` -> train, test."""
    return [re.sub(r"\[.*\]$", "", part.strip()) for part in split.split("+")]


def _check_split(builder: tfds.core.DatasetBuilder, name: str, split: str) -> None:
    available = sorted(builder.info.splits.keys())
    if not available:  # unknown splits (e.g. under tfds.testing.mock_data)
        return
    for base in _split_names(split):
        if base not in available:
            raise ValueError(
                f"unknown split {split!r} for dataset {name!r}; available: {available}"
            )


def _check_format(builder: tfds.core.DatasetBuilder, name: str, data_dir: str | None) -> None:
    fmt = builder.info.file_format
    if fmt is not None and fmt.value not in _RANDOM_ACCESS_FORMATS:
        raise ValueError(
            f"dataset {name!r} in {builder.data_dir} is prepared as {fmt.value!r}, which has no "
            f"random access; rebuild it with `tfds build {name} --file_format=array_record "
            f"--data_dir={data_dir or '<data_dir>'}`"
        )


def prepare_embedded(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Returns the prepared builder of embedded dataset ``name`` (prepares it once)."""
    with quiet_tfds():
        return _prepare_embedded(name, data_dir)


def _prepare_embedded(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    if name not in EMBEDDED:
        raise ValueError(f"{name!r} is not an embedded dataset; embedded: {sorted(EMBEDDED)}")
    cls = EMBEDDED[name]
    builder = cls(data_dir=data_dir)
    if builder.is_prepared():
        return builder
    root = os.fspath(builder.data_dir_root)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f".{name}.prepare.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        builder = cls(data_dir=data_dir)  # re-read: another process may have prepared it
        if not builder.is_prepared():
            logging.getLogger("tl_jax").info("preparing %s into %s (once)", name, builder.data_dir)
            builder.download_and_prepare(
                file_format="array_record",
                download_config=tfds.download.DownloadConfig(try_download_gcs=False),
            )
    return cls(data_dir=data_dir)


def _catalogue_builder(name: str, split: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"unknown dataset {name!r}: not embedded ({sorted(EMBEDDED)}), not prepared by `tl-jax data "
            f"prepare` in {data_dir or 'the default data_dir'}, and not in the tfds catalogue; check "
            "config.data.name and config.data.data_dir"
        ) from None
    if builder.is_prepared():
        _check_format(builder, name, data_dir)
        _check_split(builder, name, split)
    return builder


def _not_prepared(name: str, data_dir: str | None) -> ValueError:
    where = data_dir or "the default tfds data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    return ValueError(
        f"dataset {name!r} is not prepared in {where}; on a machine with internet run "
        f"`tfds build {name} --file_format=array_record --data_dir=DIR`, copy DIR here "
        "and set config.data.data_dir=DIR"
    )


def load_split(name: str, split: str, data_dir: str | None = None) -> DataSplit:
    """Opens ``name:split`` for random access (see module doc for where data comes from).

    Raises:
      ValueError: unknown dataset or split, catalogue dataset not prepared in
        ``data_dir``, or prepared in a format without random access.
    """
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string for dataset {name!r}, got {split!r}")
    if is_in_memory(name):  # register_dataset(...) or a 'file.py:load' reference (tl_jax/data/in_memory.py)
        return load_in_memory(name, split)
    if name in EMBEDDED:
        builder = prepare_embedded(name, data_dir)
        _check_split(builder, name, split)
        data_source = builder.as_data_source(split=split)
    elif (user_dir := find_user_dataset(name, data_dir)) is not None:  # `tl-jax data prepare`
        builder = read_user_builder(user_dir)
        _check_split(builder, name, split)
        data_source = builder.as_data_source(split=split)
    else:
        builder = _catalogue_builder(name, split, data_dir)
        try:
            data_source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises NotImplementedError/FileNotFoundError/...
            if builder.is_prepared():
                raise
            raise _not_prepared(name, data_dir) from e
    return _make_split(name, split, builder, data_source)


def _make_split(name: str, split: str, builder: Any, data_source: Any) -> DataSplit:
    features = builder.info.features
    keys = builder.info.supervised_keys
    if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        image_key, label_key = keys
    else:
        image_key, label_key = "image", "label"
    text = "input_ids" in features and image_key not in features and label_key in features
    if not text and (image_key not in features or label_key not in features):
        raise ValueError(
            f"dataset {name!r} has no ({image_key!r}, {label_key!r}) features; it has "
            f"{sorted(features.keys())}: only image (or token id) classification datasets are supported"
        )
    num_classes = getattr(features[label_key], "num_classes", None)
    if not num_classes:
        raise ValueError(f"dataset {name!r}: feature {label_key!r} is not a ClassLabel")
    if text:  # a token-id split: examples {"input_ids", "attention_mask", "label"}; shape (L,)
        text_keys = tuple(k for k in ("input_ids", "attention_mask") if k in features)
        source = ExampleSource(data_source, label_key=label_key, text_keys=text_keys)
    else:
        source = ExampleSource(data_source, image_key, label_key)
    if len(source) == 0:
        raise ValueError(f"dataset {name!r} split {split!r} is empty")
    if text:
        return DataSplit(name, split, source, int(num_classes), tuple(int(s) for s in features["input_ids"].shape))
    shape = tuple(features[image_key].shape)
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != 3 or any(s is None for s in shape):  # variable size: first example
        shape = tuple(source[0]["image"].shape)
    return DataSplit(name, split, source, int(num_classes), tuple(int(s) for s in shape))
