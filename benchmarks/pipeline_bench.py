"""Issue 32's speed goal: the strong-augmentation input pipeline vs what the train steps consume, on this CPU.

* pipeline: the real grain training pipeline of a run (``load_split`` -> ``train_dataset`` ->
  ``mixing.wrap`` -> ``train_iterator``, as ``tl_jax/train/setup.py`` builds it) over an image folder
  prepared by ``tl-jax data prepare``'s code (:data:`IMAGES` JPEGs of 384 x 384 px, 4 classes, stored as
  tfds encodes them), ``data.cache=false`` (each example decoded per read, as for a dataset too large for
  the cache: the figure of the goal) and ``true`` (the decoded images kept in memory), with the
  recipe :data:`RECIPE` (``inception_crop`` to 224, ``flip_lr``, ``randaugment`` N=2 M=9, ``rescale``,
  ``normalize``) and mixup/cutmix :data:`MIX` (timm's ImageNet settings); examples/s of ``next()``.
* steps: the real tl_jax train steps (``build_model_and_state`` + ``pure_train_step``, jitted, the
  classification objective's soft-label loss) of ResNet-50 and ViT-S/16 on one batch of that pipeline
  (batch :data:`BATCH`, 224 px); examples/s consumed.

All timed interleaved (:func:`benchmarks.common.interleaved`, best round). Figure: the uncached
pipeline's examples/s / each step's examples/s (goal >= 1.5: the pipeline is never the bottleneck). The two are measured apart;
in a run the loop's prefetch thread produces batches while XLA runs the step on the same cores.
Standalone::

    python -m benchmarks.pipeline_bench [--quick]
"""
from __future__ import annotations

import argparse
import pathlib
import tempfile
from typing import Any

import numpy as np

from benchmarks.common import emit, interleaved, table

BATCH, SIZE, IMAGES, CLASSES = 16, 224, 64, 4
MIX = {"alpha": 0.8, "cutmix_alpha": 1.0, "switch_prob": 0.5, "prob": 1.0}
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# name -> (config.model.name, config.model.kwargs)
MODELS: dict[str, tuple[str, dict]] = {"ResNet-50": ("resnet50", {}),
                                       "ViT-S/16": ("vit", {"variant": "S", "patch_size": 16})}
GOAL = 1.5


def recipe(size: int) -> list[dict]:
    """The train_pp of the benchmark: inception crop + flip + RandAugment(2, 9) + rescale + normalize."""
    return [{"op": "inception_crop", "size": size}, {"op": "flip_lr"},
            {"op": "randaugment", "num_ops": 2, "magnitude": 9}, {"op": "rescale", "in_max": 255.0},
            {"op": "normalize", **IMAGENET}]


def make_folder(root: pathlib.Path, n: int, side: int, classes: int = CLASSES) -> pathlib.Path:
    """``n`` smooth random RGB JPEGs ``side`` x ``side`` in ``classes`` class folders under ``root``."""
    from PIL import Image

    r = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(r.integers(0, 256, (12, 12, 3), dtype=np.uint8))
        img = np.asarray(small.resize((side, side), Image.Resampling.BICUBIC), np.int16)
        img = np.clip(img + r.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i}.jpg", quality=90)
    return root


def _config(data_dir: str, name: str, size: int, batch: int, model: str = "resnet50", kwargs: dict | None = None,
            cache: bool = False):
    from tl_jax import config as config_lib

    c = config_lib.base_config()
    c.data.name, c.data.data_dir, c.data.batch_size, c.data.cache = name, data_dir, batch, cache
    c.data.train_pp = recipe(size)
    c.data.mixup = dict(MIX)
    c.model.name, c.model.kwargs = model, dict(kwargs or {})
    return c


def pipeline_iterator(c: Any):
    """The run's training batches for config ``c`` (setup.py's chain: split, cache, shuffle, pp, batch, mixup)."""
    from tl_jax.data import build_preprocess, load_split, mixing, train_dataset
    from tl_jax.data.shuffle import train_iterator

    dc = c.data
    split = load_split(dc.name, dc.train_split, dc.data_dir)
    pp = build_preprocess(list(dc.train_pp), where="config.data.train_pp")
    ds = train_dataset(split, pp, batch_size=dc.batch_size, seed=0, cache=dc.cache, cache_max_mb=dc.cache_max_mb)
    return train_iterator(mixing.wrap(ds, dc.mixup, batch_size=dc.batch_size, seed=0, num_classes=split.num_classes))


def train_step(c: Any, batch: dict):
    """A no-argument callable running the run's compiled train step on ``batch`` (state not advanced)."""
    import jax

    from tl_jax.parallel import mesh as mesh_lib
    from tl_jax.train.build import build_model_and_state
    from tl_jax.train.programs import pure_train_step

    obj, tx, state = build_model_and_state(c, CLASSES, {k: v[:1] for k, v in batch.items()}, mesh_lib.make_mesh(1))
    device_batch = jax.device_put(batch)
    fn = jax.jit(pure_train_step(c, obj, tx, state.params, grad_norm=False)).lower(state, device_batch).compile()
    return lambda: fn(state, device_batch)


def run(data_dir: str = "", quick: bool = False, *, size: int = SIZE, batch: int = BATCH, images: int = IMAGES,
        models: dict[str, tuple[str, dict]] | None = None) -> dict[str, Any]:
    """Examples/s of the pipeline and of each model's train step; ``ratios`` = pipeline / step."""
    import jax

    from tl_jax.data.image_folder import prepare_image_folder

    models = MODELS if models is None else models
    with tempfile.TemporaryDirectory(prefix="tl_jax_pipeline_bench_") as tmp:
        data_dir = data_dir or tmp
        stored = size * 12 // 7  # 384 px for 224: ImageNet-like originals, cropped then resized by the recipe
        folder = make_folder(pathlib.Path(tmp) / "folder", images, stored)
        prepare_image_folder(folder, "pipeline_bench", data_dir, test_fraction=0.25, overwrite=True)
        its = {key: pipeline_iterator(_config(data_dir, "pipeline_bench", size, batch, cache=cache))
               for key, cache in (("pipeline", False), ("pipeline_cached", True))}
        sample = next(its["pipeline"])
        per_call = 2 if quick else 4  # batches per timed pipeline call
        fns = {key: (lambda it=it: [next(it) for _ in range(per_call)]) for key, it in its.items()}
        for label, (name, kwargs) in models.items():
            fns[label] = train_step(_config(data_dir, "pipeline_bench", size, batch, name, kwargs), sample)
        seconds = interleaved(fns, rounds=2 if quick else 3, reps=1 if quick else 2, sync=jax.block_until_ready)
    per_s = {k: batch * (per_call if k in its else 1) / s for k, s in seconds.items()}
    steps = [k for k in per_s if k not in its]
    return {"batch": batch, "size": size, "stored": stored, "images": images,
            "ops": [op["op"] for op in recipe(size)] + ["mixup/cutmix"], "examples_per_s": per_s,
            "ratios": {k: per_s["pipeline"] / per_s[k] for k in steps},
            "ratios_cached": {k: per_s["pipeline_cached"] / per_s[k] for k in steps}}


def goals(result: dict) -> list[list]:
    """Rows for the goals table: one per model, pipeline examples/s / step examples/s (goal >= 1.5)."""
    ratios = (result or {}).get("ratios") or {}
    return [["32 pipeline", f"randaugment + inception_crop + mixup examples/s / {m} train step's (224 px)",
             f">= {GOAL}", f"{r:.1f}", "yes" if r >= GOAL else "**no**"] for m, r in ratios.items()]


def render(result: dict) -> str:
    """The section's markdown: examples/s of the pipeline and of each train step, and the ratios."""
    per_s, ratios, cached = result["examples_per_s"], result["ratios"], result["ratios_cached"]
    rows = [[f"{m} train step, batch {result['batch']}", per_s[m], ratios[m], cached[m]] for m in ratios]
    ops = " + ".join(result["ops"])
    return (table(["consumer", "examples/s", "pipeline / step", "cached pipeline / step"], rows)
            + f"\n\nThe pipeline ({ops}; {result['size']}² crops of {result['stored']}² JPEGs, {result['images']} "
            f"images): **{per_s['pipeline']:.1f} examples/s** decoding every example (`data.cache=false`), "
            f"{per_s['pipeline_cached']:.1f} with the decoded images in memory (`data.cache=true`). It is the "
            "loop's (grain, `train_iterator`'s threads), timed apart from the steps: in a run both share the cores.")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the raw result as one JSON line")
    args = ap.parse_args()
    res = run(quick=args.quick)
    emit(res) if args.json else print(render(res))
