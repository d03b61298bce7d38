"""merge_params: load a checkpoint into a fresh model, report every mismatch at once."""
import numpy as np
import pytest

from tl_jax.params.merge import MergeError, merge_params


def tree(head_classes=10, fc=8):
    return {"backbone": {"conv": {"kernel": np.full((3, 3, 1, 4), 1.0, np.float32)},
                         "fc": {"kernel": np.full((4, fc), 2.0, np.float32)}},
            "head": {"kernel": np.zeros((fc, head_classes), np.float32), "bias": np.zeros(head_classes, np.float32)}}


def test_loads_backbone_keeps_new_head():
    loaded = tree(head_classes=10)
    loaded["backbone"]["fc"]["kernel"] += 5
    init = tree(head_classes=3)
    out = merge_params(loaded, init, dont_load=["head/.*"])
    np.testing.assert_array_equal(out["backbone"]["fc"]["kernel"], loaded["backbone"]["fc"]["kernel"])
    assert out["head"]["kernel"].shape == (8, 3)
    np.testing.assert_array_equal(out["head"]["kernel"], init["head"]["kernel"])


def test_every_mismatch_listed_in_one_error():
    loaded = tree(fc=8)
    del loaded["backbone"]["conv"]
    loaded["extra"] = {"w": np.zeros(2)}
    init = tree(fc=16, head_classes=3)
    with pytest.raises(MergeError) as err:
        merge_params(loaded, init, dont_load=["head/.*", "nothing/.*"])
    msg = str(err.value)
    assert "missing in checkpoint: backbone/conv/kernel (3, 3, 1, 4)" in msg
    assert "shape mismatch at backbone/fc/kernel: checkpoint has (4, 8), model expects (4, 16)" in msg
    assert "unused in the model: extra/w" in msg
    assert "dont_load rule 'nothing/.*' matches no param" in msg
    assert "4 problem(s)" in msg


def test_dtype_follows_init():
    loaded = tree()
    loaded = {"backbone": {k: {kk: vv.astype(np.float16) for kk, vv in v.items()}
                           for k, v in loaded["backbone"].items()}, "head": loaded["head"]}
    out = merge_params(loaded, tree(), dont_load=[])
    assert out["backbone"]["fc"]["kernel"].dtype == np.float32
