"""Image folders -> a tfds array_record dataset: ``prepare_image_folder``.

Two layouts are read (as Keras ``image_dataset_from_directory`` and torchvision
``ImageFolder`` do: class = sub-folder name, classes in sorted order, files
found recursively inside each class folder)::

    DIR/<class>/**/<image>                 seeded stratified train/test split
    DIR/train/<class>/**, DIR/test/<class>/**   the given split folders

Every file is decoded with pillow; files that are not readable images are
reported by path and skipped (hidden files, ``.*``, are ignored). A class
folder without a readable image is an error. Images are converted to RGB
(``channels=3``) or grayscale (``channels=1``) and, if ``image_size=(H, W)`` is
given, resized by a policy: ``stretch`` (ignore the aspect ratio), ``crop``
(scale to cover, centre crop: Keras ``crop_to_aspect_ratio``) or ``pad`` (scale
to fit, centre on black: Keras ``pad_to_aspect_ratio``); without
``image_size`` all images must share one size. Stored example:
``{"image": uint8 [H, W, C], "label": int}``.
"""
from __future__ import annotations

import pathlib
import warnings
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

from tl_jax.data import user_datasets as ud

RESIZE_POLICIES = ("stretch", "crop", "pad")
SPLIT_FOLDERS = ("train", "test")
_BILINEAR = Image.Resampling.BILINEAR


def _visible(path: pathlib.Path) -> bool:
    return not path.name.startswith(".")


def _subdirs(path: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and _visible(p))


def _files(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(folder).parts))


def _layout(root: pathlib.Path) -> dict[str, pathlib.Path] | None:
    """``{"train": DIR/train, "test": DIR/test}`` for given split folders, else None."""
    dirs = {p.name for p in _subdirs(root)}
    if dirs == set(SPLIT_FOLDERS) and all(_subdirs(root / s) for s in SPLIT_FOLDERS):
        return {s: root / s for s in SPLIT_FOLDERS}
    return None


def _probe(path: pathlib.Path) -> tuple[int, int] | str:
    """``(width, height)`` of a fully decodable image, or the reason it is not one."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.load()
                return im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"not a readable image ({type(e).__name__}: {str(e)[:120]})"


def load_image(path: pathlib.Path, channels: int, image_size: tuple[int, int] | None, resize: str) -> np.ndarray:
    """Decodes ``path`` to uint8 ``[H, W, channels]`` (resized to ``image_size`` by ``resize``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB" if channels == 3 else "L")
    if image_size is not None:
        h, w = image_size
        if resize == "stretch":
            im = im.resize((w, h), _BILINEAR)
        elif resize == "crop":
            im = ImageOps.fit(im, (w, h), _BILINEAR)
        else:
            im = ImageOps.pad(im, (w, h), _BILINEAR, color=0)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _scan_classes(split_dir: pathlib.Path, classes: list[str], skipped: list, where: str) -> list[tuple]:
    """``[(path, label, (width, height))]`` of the readable images below ``split_dir/<class>``.

    Unreadable files are appended to ``skipped`` as ``(path, reason)``.
    """
    items = []
    for label, cls in enumerate(classes):
        folder = split_dir / cls
        if not folder.is_dir():
            continue
        found = 0
        for f in _files(folder):
            probe = _probe(f)
            if isinstance(probe, str):
                skipped.append((str(f), probe))
                continue
            items.append((str(f), label, probe))
            found += 1
        if not found:
            raise ValueError(f"class folder {folder} holds no readable image{where}")
    return items


def prepare_image_folder(
    root: str | pathlib.Path,
    name: str,
    data_dir: str | None = None,
    *,
    image_size: tuple[int, int] | None = None,
    resize: str = "stretch",
    channels: int = 3,
    test_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
) -> ud.PreparedDataset:
    """Turns an image folder into dataset ``name`` in ``data_dir`` (see module doc).

    Args:
      root: the folder (class sub-folders, or ``train/`` and ``test/`` folders of them).
      name: dataset name for ``config.data.name`` (lower snake_case).
      data_dir: tfds data dir (``config.data.data_dir``); None = tfds' default.
      image_size: ``(H, W)`` to resize to; None keeps sizes (then all must agree).
      resize: ``stretch`` | ``crop`` | ``pad`` (only with ``image_size``).
      channels: 3 (RGB) or 1 (grayscale).
      test_fraction, seed: the stratified split when there are no split folders.
      overwrite: replace an existing dataset of that name.

    Raises:
      ValueError: no class folders, an empty class folder, mixed image sizes
        without ``image_size``, a bad option, or an existing dataset.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    ud.check_name(name)
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {resize!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if image_size is not None:
        image_size = (int(image_size[0]), int(image_size[1]))
        if min(image_size) < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")

    given = _layout(root)
    class_root = given["train"] if given else root
    classes = [p.name for p in _subdirs(class_root)]
    if not classes:
        raise ValueError(f"{class_root} has no class sub-folders (expected {class_root}/<class>/<image files>)")
    skipped: list[tuple[str, str]] = [(str(f), "not inside a class folder")
                                      for f in sorted(class_root.iterdir()) if f.is_file() and _visible(f)]
    if given:
        extra = sorted({p.name for p in _subdirs(given["test"])} - set(classes))
        if extra:
            raise ValueError(f"{given['test']} has class folder(s) {extra} that {given['train']} lacks")
        train_items = _scan_classes(given["train"], classes, skipped, "")
        test_items = _scan_classes(given["test"], classes, skipped, " (test split)")
        items = train_items + test_items
        split_idx = {"train": np.arange(len(train_items)),
                     "test": np.arange(len(train_items), len(items))}
    else:
        items = _scan_classes(root, classes, skipped, "")
        train_idx, test_idx = ud.stratified_split(np.array([it[1] for it in items]), test_fraction, seed)
        split_idx = {"train": train_idx, "test": test_idx}

    sizes = {it[2] for it in items}
    if image_size is None and len(sizes) > 1:
        w0, h0 = items[0][2]
        other = next(it for it in items if it[2] != (w0, h0))
        raise ValueError(f"images have different sizes ({items[0][0]} is {h0}x{w0}, {other[0]} is "
                         f"{other[2][1]}x{other[2][0]}); pass --image-size H W (and --resize)")
    shape = (*image_size, channels) if image_size else (items[0][2][1], items[0][2][0], channels)

    def generate(split: str):
        def gen() -> Iterator[dict]:
            for i in split_idx[split]:
                path, label, _ = items[int(i)]
                yield {"image": load_image(pathlib.Path(path), channels, image_size, resize), "label": label}
        return gen

    metadata = {"kind": "image_folder", "source": str(root.absolute()), "layout": "split_folders" if given else
                "class_folders", "class_names": classes, "image_size": list(image_size) if image_size else None,
                "resize": resize, "channels": channels, "test_fraction": None if given else test_fraction,
                "seed": None if given else seed, "skipped": [list(s) for s in skipped]}
    features = {"image": tfds.features.Tensor(shape=shape, dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=classes)}
    path = ud.write_dataset(name, data_dir, features, {s: generate(s) for s in SPLIT_FOLDERS}, metadata,
                            description=f"Images from {root} ({len(classes)} classes), prepared by tl-jax.",
                            supervised_keys=("image", "label"), overwrite=overwrite)
    return ud.PreparedDataset(name, path, tuple(classes), {s: len(v) for s, v in split_idx.items()},
                              tuple(skipped), metadata)
