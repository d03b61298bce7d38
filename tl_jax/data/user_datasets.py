"""User-prepared datasets: written as tfds ``array_record`` folders, found again by name.

``tl-jax data prepare`` (:mod:`tl_jax.data.image_folder`, :mod:`tl_jax.data.text_csv`)
writes a dataset ``NAME`` into ``<data_dir>/NAME/1.0.0/`` with a generic
``GeneratorBasedBuilder`` built on the fly (never registered in tfds' catalogue).
tfds stores the features, splits and our ``metadata.json`` (``{"tl_jax": {...}}``:
kind, class names, skipped inputs, tokenizer, ...) next to the records, so the
folder is read back with ``tfds.builder_from_directory`` and no code of ours:
:func:`find_user_dataset` is what ``load_split`` uses to find it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from tl_jax.data.builders import EMBEDDED
from tl_jax.util.quiet import quiet_tfds

VERSION = "1.0.0"
METADATA_KEY = "tl_jax"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
log = logging.getLogger("tl_jax")


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """What ``prepare_*`` wrote.

    Attributes:
      name: the dataset name (``config.data.name``).
      path: the tfds version folder ``<data_dir>/<name>/1.0.0``.
      class_names: label names; label ``i`` is ``class_names[i]``.
      split_sizes: ``{"train": n, "test": m}``.
      skipped: ``(path or file:line, reason)`` of every input left out.
      metadata: the ``tl_jax`` metadata stored with the data.
    """

    name: str
    path: pathlib.Path
    class_names: tuple[str, ...]
    split_sizes: dict[str, int]
    skipped: tuple[tuple[str, str], ...]
    metadata: dict

    def summary(self) -> str:
        """One human-readable paragraph (what the CLI prints)."""
        sizes = ", ".join(f"{k} {v}" for k, v in self.split_sizes.items())
        lines = [f"prepared {self.name!r} in {self.path}: {len(self.class_names)} classes "
                 f"{list(self.class_names)[:20]}; {sizes}"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} input(s):")
            lines += [f"  {where}: {why}" for where, why in self.skipped]
        return "\n".join(lines)


def default_data_dir() -> str:
    """tfds' default data dir (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``)."""
    return os.fspath(tfds.core.constants.DATA_DIR)


def check_name(name: str) -> None:
    """A new dataset name must be snake_case and not shadow an embedded/catalogue dataset."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"dataset name {name!r} must be lower snake_case ([a-z][a-z0-9_]*), e.g. 'my_flowers'")
    if name in EMBEDDED or name in tfds.list_builders(with_community_datasets=False):
        raise ValueError(f"dataset name {name!r} is already an embedded or tfds catalogue dataset; choose another")


def find_user_dataset(name: str, data_dir: str | None) -> pathlib.Path | None:
    """The version folder of user-prepared ``name`` in ``data_dir``, or None."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        return None
    root = pathlib.Path(data_dir or default_data_dir()) / name
    if not root.is_dir():
        return None
    for version_dir in sorted(root.iterdir(), reverse=True):
        meta = version_dir / "metadata.json"
        if (version_dir / "dataset_info.json").is_file() and meta.is_file() and METADATA_KEY in meta.read_text():
            return version_dir
    return None


def read_user_builder(path: pathlib.Path) -> tfds.core.DatasetBuilder:
    """A read-only tfds builder over a prepared version folder."""
    return tfds.builder_from_directory(os.fspath(path))


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, test_idx)``: per class, ``round(n * f)`` examples go to test.

    Every class with >= 2 examples keeps at least one in each split; a class
    with one example goes to train. ``train_idx`` is in a seeded shuffled
    order, ``test_idx`` sorted. Same ``(labels, f, seed)`` -> same split.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = min(max(int(round(len(idx) * test_fraction)), 1), len(idx) - 1) if len(idx) > 1 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_idx = np.concatenate(train)
    return train_idx[rng.permutation(len(train_idx))], np.sort(np.concatenate(test))


def write_dataset(
    name: str,
    data_dir: str | None,
    features: dict[str, tfds.features.FeatureConnector],
    splits: dict[str, Callable[[], Iterator[dict]]],
    metadata: dict,
    *,
    description: str,
    supervised_keys: tuple[str, str] | None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes ``splits`` (``{split: () -> iterator of example dicts}``) as array_record.

    Examples are stored in iteration order (``disable_shuffling``). Returns the
    version folder. An existing dataset of that name is an error unless
    ``overwrite`` (then it is deleted first).
    """
    data_dir = data_dir or default_data_dir()
    target = pathlib.Path(data_dir) / name / VERSION
    if target.exists():
        if not overwrite:
            raise ValueError(f"dataset {name!r} already exists in {target}; pass --overwrite to replace it")
        shutil.rmtree(target)
    builder_cls = _builder_class(name, features, splits, {METADATA_KEY: metadata}, description, supervised_keys)
    with quiet_tfds(stdout=True):
        builder = builder_cls(data_dir=data_dir)
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    log.info("wrote %s", target)
    return target


def _builder_class(
    name: str,
    features: dict[str, Any],
    splits: dict[str, Callable[[], Iterator[dict]]],
    metadata: dict,
    description: str,
    supervised_keys: Sequence[str] | None,
) -> type[tfds.core.GeneratorBasedBuilder]:
    """A one-off, unregistered builder class named ``name`` (tfds uses ``cls.name``)."""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=description,
            features=tfds.features.FeaturesDict(dict(features)),
            supervised_keys=tuple(supervised_keys) if supervised_keys else None,
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(metadata),
        )

    def _split_generators(self, dl_manager):  # noqa: ARG001 - nothing to download
        return {split: self._generate_examples(split) for split in splits}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        yield from enumerate(splits[split]())

    def code_path(cls) -> epath.Path:  # see builders._EmbeddedBuilder.code_path
        return epath.Path(__file__)

    namespace = {
        "name": name,
        "VERSION": tfds.core.Version(VERSION),
        "RELEASE_NOTES": {VERSION: "Prepared by tl-jax data prepare."},
        "_info": _info,
        "_split_generators": _split_generators,
        "_generate_examples": _generate_examples,
        "code_path": tfds.core.utils.classproperty(classmethod(code_path)),
        "__module__": __name__,
    }
    with tfds.core.registered.skip_registration():
        return type("UserDataset", (tfds.core.GeneratorBasedBuilder,), namespace)
