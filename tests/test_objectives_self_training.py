"""FixMatch-style self-training: the masked pseudo-label loss; the two-view target stream and exact resume."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax.data import build_preprocess, load_split, train_dataset
from tl_jax.objectives.classification import cross_entropy
from tl_jax.objectives.self_training import fixmatch_loss
from objective_setup import BATCH, TGT_PP, outputs, setup


RNG = np.random.default_rng(0)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_fixmatch_masks_by_confidence_and_trains_only_the_strong_view():
    weak = np.array([[5.0, 0, 0], [0.1, 0, 0.2], [0, 0, 9.0], [0, 3.0, 0]])
    strong = RNG.normal(size=(4, 3))
    p = softmax(weak)
    mask = p.max(1) >= 0.9
    pseudo = p.argmax(1)
    want = np.mean(mask * -np.log(softmax(strong)[np.arange(4), pseudo]))
    loss, m = fixmatch_loss(jnp.asarray(weak), jnp.asarray(strong), threshold=0.9)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(m["mask_rate"]) == mask.mean() == 0.75
    gw = jax.grad(lambda w: fixmatch_loss(w, jnp.asarray(strong), threshold=0.9)[0])(jnp.asarray(weak))
    assert np.all(np.asarray(gw) == 0)   # pseudo-labels are constants


SRC_PP = [{"op": "rescale", "in_max": 255.0}, {"op": "resize", "size": 14}]

def test_self_training_loss_uses_weak_pseudo_labels_on_the_strong_view():
    obj, params, aux = setup("self_training", weight=1.5, threshold=0.0)
    loss, (_, m) = obj.loss(params, {}, aux, BATCH, None, 0)
    z, _ = outputs(obj, params, jnp.concatenate([BATCH["image"], BATCH["target_image"],
                                                 BATCH["target_strong_image"]]))
    term, parts = fixmatch_loss(z[8:14], z[14:], threshold=0.0)
    np.testing.assert_allclose(float(loss), float(cross_entropy(z[:8], BATCH["label"]).mean() + 1.5 * term),
                               rtol=1e-5)
    assert float(m["train/da/mask_rate"]) == 1.0 and float(term) > 0


def test_self_training_batches_hold_two_views_and_resume_exactly(tfds_data_dir):
    obj, _, _ = setup("self_training", tfds_data_dir, target_batch_size=6,
                      weak_pp=[{"op": "random_crop", "size": 14, "pad": 1}],
                      strong_pp=[{"op": "random_crop", "size": 14, "pad": 3}, {"op": "flip_lr"}])
    standard = train_dataset(load_split("mnist5k", "train", tfds_data_dir), build_preprocess(SRC_PP), batch_size=4,
                             seed=3)
    ds = obj.train_dataset(standard, batch_size=4, seed=3, process_index=0, process_count=1)
    plain = train_dataset(load_split("optdigits", "train", tfds_data_dir), build_preprocess(TGT_PP), batch_size=6,
                          seed=4)
    it = iter(ds)
    first = [next(it) for _ in range(2)]
    b = first[0]
    assert set(b) == {"image", "label", "target_image", "target_strong_image"}
    assert b["target_image"].shape == b["target_strong_image"].shape == (6, 14, 14, 1)
    assert not np.array_equal(b["target_image"], b["target_strong_image"])
    # both views are crops of the same target digits: equal pixel sums up to the cropped-off border
    base = plain[0]["image"]
    assert np.all(np.abs(b["target_image"].sum((1, 2, 3)) - base.sum((1, 2, 3))) <= base.sum((1, 2, 3)) + 1e-6)
    state = it.get_state()
    want = [next(it) for _ in range(2)]
    resumed = iter(ds)
    resumed.set_state(state)
    for w in want:
        got = next(resumed)
        for k in w:
            np.testing.assert_array_equal(got[k], w[k])
    with pytest.raises(ValueError, match=r"config.objective.self_training.target_pp \+ strong_pp give target images"):
        bad, _, _ = setup("self_training", tfds_data_dir, strong_pp=[{"op": "resize", "size": 10}])
        bad.train_dataset(standard, batch_size=4, seed=3, process_index=0, process_count=1)
