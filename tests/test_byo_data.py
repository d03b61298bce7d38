"""Bring your own images: image folders -> tfds array_record datasets, and the ViT model."""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tl_jax import config as config_lib
from tl_jax.cli import main
from tl_jax.data import build_preprocess, eval_batches, load_split
from tl_jax.data.image_folder import load_image, prepare_image_folder
from tl_jax.models import get_model
from tl_jax.params.merge import merge_params

BYO = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "byo.py"
COLORS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}


def make_folder(root: pathlib.Path, n: int = 6, classes=COLORS) -> pathlib.Path:
    """``root/<class>/i.png``: n solid-colour images of various sizes, one more in a sub-folder."""
    for cls, color in classes.items():
        (root / cls / "more").mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (6 + i, 5 + 2 * i), color).save(root / cls / f"{i}.png")
        Image.new("RGB", (9, 9), color).save(root / cls / "more" / "nested.jpg", quality=100)
    return root


@pytest.fixture()
def folder(tmp_path) -> pathlib.Path:
    root = make_folder(tmp_path / "photos")
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "green" / "notes.txt").write_text("not an image")
    (root / "green" / ".DS_Store").write_bytes(b"\0\1")
    (root / "README.md").write_text("loose file")
    return root


def test_image_folder_round_trip(folder, tmp_path):
    data_dir = str(tmp_path / "tfds")
    res = prepare_image_folder(folder, "my_photos", data_dir, image_size=(8, 8), resize="pad",
                               test_fraction=1 / 3, seed=0)
    assert res.class_names == ("blue", "green", "red")
    assert res.split_sizes == {"train": 15, "test": 6}  # 7 readable per class, round(7/3) = 2 to test
    skipped = dict(res.skipped)
    assert set(skipped) == {str(folder / "red" / "broken.jpg"), str(folder / "green" / "notes.txt"),
                            str(folder / "README.md")}
    assert "not a readable image" in skipped[str(folder / "red" / "broken.jpg")]
    assert "broken.jpg" in res.summary() and "3 classes" in res.summary()

    train = load_split("my_photos", "train", data_dir)
    test = load_split("my_photos", "test", data_dir)
    assert (len(train), len(test), train.num_classes, train.image_shape) == (15, 6, 3, (8, 8, 3))
    assert np.bincount(train.labels()).tolist() == [5, 5, 5]
    for split in (train, test):
        for i in range(len(split)):
            ex = split.source[i]
            assert ex["image"].dtype == np.uint8 and ex["image"].shape == (8, 8, 3)
            color = np.array(COLORS[res.class_names[ex["label"]]])
            assert np.abs(ex["image"][4, 4].astype(int) - color).max() <= 3  # (JPEG: off by one)
    batches = list(eval_batches(test, build_preprocess([{"op": "rescale", "in_max": 255}]), batch_size=4))
    assert [b["image"].shape for b in batches] == [(4, 8, 8, 3)] * 2 and batches[1]["mask"].sum() == 2

    again = prepare_image_folder(folder, "my_photos_again", data_dir, image_size=(8, 8), test_fraction=1 / 3)
    assert load_split(again.name, "train", data_dir).labels().tolist() == train.labels().tolist()


def test_resize_policies(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (8, 4), (255, 255, 255)).save(path)  # 4 rows x 8 columns, white
    pad = load_image(path, 3, (8, 8), "pad")
    assert pad.shape == (8, 8, 3) and pad[0].max() == 0 and pad[-1].max() == 0 and pad[4].min() == 255
    for policy in ("crop", "stretch"):
        assert load_image(path, 3, (8, 8), policy).min() == 255
    gray = load_image(path, 1, (2, 3), "stretch")
    assert gray.shape == (2, 3, 1) and gray.dtype == np.uint8


def test_given_split_folders(tmp_path):
    root = tmp_path / "split"
    make_folder(root / "train", n=3)
    make_folder(root / "test", n=1, classes={"red": COLORS["red"], "blue": COLORS["blue"]})
    res = prepare_image_folder(root, "split_photos", str(tmp_path / "tfds"), image_size=(4, 4), resize="crop")
    assert res.split_sizes == {"train": 12, "test": 4} and res.metadata["layout"] == "split_folders"
    test = load_split("split_photos", "test", str(tmp_path / "tfds"))
    assert sorted(test.labels().tolist()) == [0, 0, 2, 2]  # blue = 0, red = 2 of (blue, green, red)

    (root / "test" / "purple").mkdir()
    Image.new("RGB", (4, 4)).save(root / "test" / "purple" / "x.png")
    with pytest.raises(ValueError, match=r"class folder\(s\) \['purple'\]"):
        prepare_image_folder(root, "split_photos2", str(tmp_path / "tfds"), image_size=(4, 4))


def test_errors_name_the_problem(tmp_path, folder):
    data_dir = str(tmp_path / "tfds")
    (folder / "yellow").mkdir()
    with pytest.raises(ValueError, match=f"class folder {folder / 'yellow'} holds no readable image"):
        prepare_image_folder(folder, "bad_one", data_dir, image_size=(4, 4))
    (folder / "yellow" / "junk.png").write_bytes(b"junk")  # only an unreadable file: still empty
    with pytest.raises(ValueError, match="yellow holds no readable image"):
        prepare_image_folder(folder, "bad_one", data_dir, image_size=(4, 4))
    (folder / "yellow" / "junk.png").unlink()
    (folder / "yellow").rmdir()
    with pytest.raises(ValueError, match=r"images have different sizes .* pass --image-size"):
        prepare_image_folder(folder, "bad_one", data_dir)
    with pytest.raises(ValueError, match="lower snake_case"):
        prepare_image_folder(folder, "Bad-Name", data_dir, image_size=(4, 4))
    with pytest.raises(ValueError, match="already an embedded or tfds catalogue dataset"):
        prepare_image_folder(folder, "mnist", data_dir, image_size=(4, 4))
    with pytest.raises(ValueError, match="resize must be one of"):
        prepare_image_folder(folder, "ok_name", data_dir, image_size=(4, 4), resize="zoom")
    prepare_image_folder(folder, "ok_name", data_dir, image_size=(4, 4))
    with pytest.raises(ValueError, match="already exists .* --overwrite"):
        prepare_image_folder(folder, "ok_name", data_dir, image_size=(4, 4))
    res = prepare_image_folder(folder, "ok_name", data_dir, image_size=(5, 5), overwrite=True)
    assert load_split("ok_name", "train", data_dir).image_shape == (5, 5, 3) and res.split_sizes["test"] == 3
    with pytest.raises(ValueError, match="not prepared by `tl-jax data prepare`"):
        load_split("not_there", "train", data_dir)


def test_cli_prepare(tmp_path, folder, capsys):
    data_dir = str(tmp_path / "tfds")
    args = ["data", "prepare", "--image-folder", str(folder), "--name", "cli_photos", "--data-dir", data_dir,
            "--image-size", "6", "6", "--resize", "crop", "--test-fraction", "0.25", "--seed", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "prepared 'cli_photos'" in out and "broken.jpg" in out and "--config.data.name=cli_photos" in out
    assert load_split("cli_photos", "test", data_dir).image_shape == (6, 6, 3)
    (folder / "empty_class").mkdir()
    assert main([*args[:5], "cli_photos2", *args[6:]]) == 2
    err = capsys.readouterr().err
    assert "empty_class holds no readable image" in err and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("variant, patch, size, expected", [("Ti", 16, 224, 5_717_416), ("S", 16, 224, 22_050_664)])
def test_vit_param_counts_match_reference(variant, patch, size, expected):
    """Same counts as the reference ViT-Ti/16 and ViT-S/16 (1000 classes, 224 px: timm's 5.72M / 22.05M)."""
    model = get_model("vit", 1000, variant=variant, patch_size=patch)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == expected
    assert set(shapes["params"]) == {"backbone", "head"}


def test_vit_small_images_backbone_head_and_errors():
    kw = dict(patch_size=4, hidden_size=32, num_heads=2, mlp_dim=64, depth=1, pooling="gap")
    model = get_model("vit", 5, **kw)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    init = jax.jit(model.init)(jax.random.key(0), x)
    logits, feats = jax.jit(lambda v, x: model.apply(v, x, return_features=True))(init, x)
    assert logits.shape == (2, 5) and feats.shape == (2, 32)
    assert init["params"]["backbone"]["pos_embedding"].shape == (1, 16, 32)  # (16/4)^2 patches, no cls
    other = jax.eval_shape(get_model("vit", 3, **kw).init, jax.random.key(2), x)
    other = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), other)
    merged = merge_params(init["params"], other["params"], dont_load=["head/.*"])
    assert merged["head"]["kernel"].shape == (32, 3)
    np.testing.assert_array_equal(merged["backbone"]["embedding"]["kernel"],
                                  init["params"]["backbone"]["embedding"]["kernel"])
    with pytest.raises(ValueError, match="multiples of patch_size=4"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 30, 30, 3)))
    with pytest.raises(ValueError, match="unknown variant 'XL'"):
        jax.eval_shape(get_model("vit", 2, variant="XL").init, jax.random.key(0), x)


@pytest.mark.slow
def test_train_vit_on_prepared_folder(tmp_path):
    """A prepared folder is usable by name in a config: a tiny ViT learns the colours."""
    from tl_jax.train.loop import train

    data_dir = str(tmp_path / "tfds")
    prepare_image_folder(make_folder(tmp_path / "photos", n=8), "colours", data_dir, image_size=(8, 8))
    c = config_lib.load_config(f"{BYO}:kind=image,name=colours,data_dir={data_dir},steps=40,batch_size=8,lr=0.01")
    config_lib.apply_overrides(c, [
        'model.kwargs={"patch_size": 4, "hidden_size": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32}',
        "train.progress=false"])
    summary = train(c, str(tmp_path / "run"))
    assert summary["test/accuracy"] == 1.0
