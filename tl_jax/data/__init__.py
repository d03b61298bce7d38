"""Data: embedded/catalogue tfds splits, few-shot subsets, preprocessing, pipelines.

Typical use::

    split = load_split("mnist5k", "train", data_dir)
    pp = build_preprocess([{"op": "rescale", "in_max": 255}], where="config.data.pp")
    idx = sample_shots(split.labels(), shots=10, seed=0, name="mnist5k:train")
    it = iter(train_dataset(split, pp, batch_size=32, seed=0, indices=idx))

Your own arrays: ``register_dataset("my_data", train={"image": x, "label": y}, test=...)``, then
``config.data.name = "my_data"`` (:mod:`tl_jax.data.in_memory`).
"""

from tl_jax.data.pipeline import eval_batches, num_eval_batches, train_dataset
from tl_jax.data.preprocess import Preprocess, build_preprocess
from tl_jax.data.shots import sample_shots
from tl_jax.data.in_memory import register_dataset
from tl_jax.data.sources import EMBEDDED, load_split
from tl_jax.data.split import DataSplit

__all__ = [
    "EMBEDDED",
    "DataSplit",
    "Preprocess",
    "build_preprocess",
    "eval_batches",
    "load_split",
    "num_eval_batches",
    "register_dataset",
    "sample_shots",
    "train_dataset",
]
