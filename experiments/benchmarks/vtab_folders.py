"""The 7 VTAB-1k tasks whose labels VTAB derives from other features, exported as image folders.

Clevr (count, closest-object distance), KITTI (closest-vehicle distance), dSprites (x position, orientation,
both binned to 16 classes) and smallNORB (azimuth, elevation) have no ready (image, label) pair in tfds; VTAB
computes the label from each example (``google-research/task_adaptation``, ``task_adaptation/data/{clevr,kitti,
dsprites,smallnorb}.py``). :data:`LABELS` is the same computation in numpy, one function per task, and
:func:`export` reads the tfds dataset (``tfds.data_source``, no TensorFlow; it must be prepared as array_record
in ``--data-dir``) and writes, with VTAB's splits from ``vtab1k.TASKS``::

    OUT/<task>/train/<label>/<i>.png         train800 + val200 (1,000 images)   -> dataset vtab_<task>
    OUT/<task>/test/<label>/<i>.png          the task's test split
    OUT/<task>_tune/train/<label>/<i>.png    train800                           -> dataset vtab_<task>_tune
    OUT/<task>_tune/test/<label>/<i>.png     val200

then each is prepared at 224x224 (VTAB's ``resize(224)``)::

    for d in clevr kitti dsprites smallnorb; do tfds build $d --file_format=array_record --data_dir=data; done
    python experiments/benchmarks/vtab_folders.py --data-dir data --out vtab_folders
    for t in clevr_count clevr_dist kitti_dist dsprites_loc dsprites_ori smallnorb_azi smallnorb_ele; do
      for s in "" _tune; do
        tl-jax data prepare --image-folder vtab_folders/$t$s --name vtab_$t$s --data-dir data --image-size 224 224
      done
    done

The test split is written whole (Clevr 15,000, dSprites 73,728, smallNORB 12,150, KITTI 711 images).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

from tl_jax.sweep.study import sibling_module


def clevr_count(ex: dict) -> int:
    """The number of objects minus 3 (Clevr scenes hold 3..10): 8 classes."""
    return len(ex["objects"]["size"]) - 3


def _bin(value: float, thresholds: list[float]) -> int:
    """The largest ``i`` with ``thresholds[i] < value`` (VTAB's ``reduce_max(where(thrs - value < 0))``)."""
    return int(np.max(np.nonzero(np.asarray(thresholds) - value < 0)[0]))


def clevr_dist(ex: dict) -> int:
    """The closest object's depth (``pixel_coords[:, 2]``) binned at 0, 8, 8.5, 9, 9.5, 10, 100: 6 classes."""
    return _bin(float(np.min(np.asarray(ex["objects"]["pixel_coords"])[:, 2])), [0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])


def kitti_dist(ex: dict) -> int:
    """The closest vehicle's (type < 3: car, van, truck) depth ``location[:, 2]``, 1000 without one, binned at
    -100, 8, 20, 999: 4 classes."""
    objects = ex["objects"]
    depth = np.asarray(objects["location"], np.float64).reshape(-1, 3)[:, 2]
    vehicles = depth[np.asarray(objects["type"]) < 3]
    return _bin(float(np.min(np.append(vehicles, 1000.0))), [-100.0, 8.0, 20.0, 999.0])


def dsprites_loc(ex: dict) -> int:
    """``label_x_position`` (32 values) // 2: 16 classes."""
    return int(ex["label_x_position"] // (32 / 16))


def dsprites_ori(ex: dict) -> int:
    """``label_orientation`` (40 values) // 2.5: 16 classes."""
    return int(ex["label_orientation"] // (40 / 16))


LABELS = {  # task -> (tfds dataset, label function)
    "clevr_count": ("clevr", clevr_count),
    "clevr_dist": ("clevr", clevr_dist),
    "kitti_dist": ("kitti", kitti_dist),
    "dsprites_loc": ("dsprites", dsprites_loc),
    "dsprites_ori": ("dsprites", dsprites_ori),
    "smallnorb_azi": ("smallnorb", lambda ex: int(ex["label_azimuth"])),
    "smallnorb_ele": ("smallnorb", lambda ex: int(ex["label_elevation"])),
}


def _vtab1k():
    return sibling_module(__file__, "vtab1k.py")


def to_rgb8(image: np.ndarray, scale: int = 1) -> np.ndarray:
    """uint8 ``[H, W, 3]`` of ``image * scale``, grey tiled to RGB (dSprites' 0/1 masks: ``scale=255``, VTAB's
    ``* 255``)."""
    image = np.asarray(image).astype(np.int64) * scale
    if image.ndim == 2:
        image = image[..., None]
    return np.repeat(image, 3, axis=-1).astype(np.uint8) if image.shape[-1] == 1 else image.astype(np.uint8)


def write_split(source, label_fn, num_classes: int, folder: pathlib.Path, where: str, scale: int = 1) -> set[int]:
    """Every example of ``source`` as ``folder/<label>/<i>.png`` (labels zero-padded, so the sorted class folders
    are the label order); returns the labels written. A label outside ``[0, num_classes)`` is an error naming
    ``where`` and the example."""
    from PIL import Image  # deferred: only the export needs pillow

    labels = set()
    for i in range(len(source)):
        ex = source[i]
        label = label_fn(ex)
        if not 0 <= label < num_classes:
            raise ValueError(f"{where}[{i}]: label {label} outside [0, {num_classes})")
        out = folder / f"{label:02d}"
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(to_rgb8(ex["image"], scale)).save(out / f"{i:06d}.png")
        labels.add(label)
    return labels


def export(task: str, data_dir: str | None, out: str | pathlib.Path) -> dict[str, int]:
    """Writes ``out/<task>`` and ``out/<task>_tune`` (module doc); returns the images per folder."""
    import tensorflow_datasets as tfds  # deferred: reading tfds is only needed here

    if task not in LABELS:
        raise ValueError(f"task {task!r}: the exported VTAB tasks are {sorted(LABELS)}")
    name, label_fn = LABELS[task]
    spec = _vtab1k().TASKS[task]
    out = pathlib.Path(out)
    layout = {f"{task}/train": f"{spec.train800}+{spec.val200}", f"{task}/test": spec.test,
              f"{task}_tune/train": spec.train800, f"{task}_tune/test": spec.val200}
    counts = {}
    for folder, split in layout.items():
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        labels = write_split(source, label_fn, spec.num_classes, out / folder, f"{name}:{split}",
                             scale=255 if name == "dsprites" else 1)
        missing = sorted(set(range(spec.num_classes)) - labels)
        if folder.endswith("/train") and missing:  # tl-jax data prepare numbers the train class folders in order
            raise ValueError(f"{name}:{split} has no example of class(es) {missing}: the prepared labels would "
                             f"shift; export from the full dataset")
        counts[folder] = len(source)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None, help="tfds data_dir holding clevr, kitti, dsprites, smallnorb")
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", default=";".join(LABELS))
    args = p.parse_args(argv)
    for task in args.tasks.split(";"):
        print(task, export(task, args.data_dir, args.out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
