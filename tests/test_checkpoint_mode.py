"""config.train.checkpoint_async and checkpoint_compression: which saves run in orbax's background threads, what they
write, and that every mode saves and restores the same run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax.train import checkpoint as checkpoint_lib
from tl_jax.train import loop as loop_lib
from tl_jax.train.checkpoint import ASYNC_MIN_BYTES, use_async_save
from tl_jax.util.tree_paths import flatten_paths

TINY = "tests/configs/tiny.py"
SMALL = {"w": jnp.zeros((3, 4)), "opt": (jnp.zeros(()), {"mu": jnp.zeros((3, 4))})}
BIG = {"w": jax.ShapeDtypeStruct((ASYNC_MIN_BYTES // 4,), jnp.float32), "b": jax.ShapeDtypeStruct((1,), jnp.int8)}


@pytest.mark.parametrize("setting, state, platform, expected", [
    ("auto", SMALL, "cpu", False),  # XLA's threads use every core: a short synchronous save costs less
    ("auto", BIG, "cpu", True),  # >= ASYNC_MIN_BYTES: overlap the long write
    ("auto", SMALL, "gpu", True),  # host cores are free on accelerators
    ("auto", SMALL, "tpu", True),
    (True, SMALL, "cpu", True),
    (False, BIG, "tpu", False),
])
def test_use_async_save(setting, state, platform, expected):
    assert use_async_save(setting, state, platform) is expected


def test_auto_uses_the_local_devices_platform():
    assert use_async_save("auto", SMALL) is (jax.local_devices()[0].platform != "cpu")


def test_bad_setting_names_the_config_key():
    with pytest.raises(ValueError, match="config.train.checkpoint_async must be 'auto', true or false, got 'yes'"):
        use_async_save("yes", SMALL, "cpu")
    c = config_lib.base_config()
    c.train.checkpoint_async = 1
    with pytest.raises(config_lib.ConfigError, match="config.train.checkpoint_async"):
        config_lib.validate(c)


def _record_checkpoints_kwarg(monkeypatch, name: str, default) -> list:
    """The value of ``Checkpoints(..., name=...)`` for every Checkpoints made from now on, in order."""
    seen = []
    init = checkpoint_lib.Checkpoints.__init__

    def recording_init(self, *args, **kwargs):
        seen.append(kwargs.get(name, default))
        init(self, *args, **kwargs)

    monkeypatch.setattr(checkpoint_lib.Checkpoints, "__init__", recording_init)
    return seen


@pytest.mark.slow
def test_sync_and_async_saves_hold_the_same_run(tmp_path, tfds_data_dir, monkeypatch):
    modes = _record_checkpoints_kwarg(monkeypatch, "async_save", True)
    saved = {}
    for setting in ("auto", True):
        c = config_lib.load_config(TINY)
        c.data.data_dir = tfds_data_dir
        c.train.checkpoint_async = setting
        wd = tmp_path / str(setting)
        loop_lib.train(c, str(wd))
        ckpts = checkpoint_lib.Checkpoints(wd / "checkpoints")
        assert ckpts.all_steps()[-1] == c.train.steps
        saved[setting] = flatten_paths(checkpoint_lib.load_variables(str(wd))["params"])
        ckpts.close()
    assert modes[:1] == [False] and modes[2:3] == [True]  # the loop's own Checkpoints of each run; 'auto' on CPUs
    assert saved["auto"].keys() == saved[True].keys()
    for k in saved["auto"]:
        np.testing.assert_array_equal(saved["auto"][k], saved[True][k], err_msg=k)



@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize("mode, best", [("max", 2), ("min", 3)])
def test_retention_keeps_the_newest_and_the_best(tmp_path, async_save, mode, best):
    ckpts = checkpoint_lib.Checkpoints(tmp_path / "c", keep=2, best_metric="test/m", best_mode=mode,
                                       async_save=async_save)
    metric = {1: 0.5, 2: 0.9, 3: 0.1, 4: 0.7, 5: 0.8}  # step 2 is the highest, step 3 the lowest
    for step, m in metric.items():
        ckpts.save(step, SMALL, {"iterator": {"step": step}}, {"test/m": m})
        ckpts.wait()
    ckpts.close()  # also waits for the background deletes
    steps = sorted(int(p.name) for p in (tmp_path / "c").iterdir() if p.name.isdigit())
    assert steps == sorted([best, 4, 5])
    again = checkpoint_lib.Checkpoints(tmp_path / "c", keep=2, best_metric="test/m", best_mode=mode)
    step, _, data = again.restore_latest(SMALL)
    assert (step, data) == (5, {"iterator": {"step": 5}})
    again.close()


def test_bad_best_mode_names_the_config_key(tmp_path):
    with pytest.raises(ValueError, match="config.train.best_mode must be 'max' or 'min', got 'maximum'"):
        checkpoint_lib.Checkpoints(tmp_path / "c", best_mode="maximum")
    c = config_lib.base_config()
    c.train.best_mode = "maximum"
    with pytest.raises(config_lib.ConfigError, match="config.train.best_mode"):
        config_lib.validate(c)


def _state_bytes(step_dir) -> int:
    return sum(p.stat().st_size for p in (step_dir / "state").rglob("*") if p.is_file())


def test_compression_is_off_by_default_and_either_kind_restores(tmp_path):
    assert config_lib.base_config().train.checkpoint_compression is False
    rng = np.random.default_rng(0)
    state = {"w": jnp.zeros((256, 256)),  # zeros: zstd shrinks them to almost nothing
             "opt": (jnp.ones(()), {"mu": jnp.asarray(rng.normal(size=(64, 32)).astype(np.float32))})}
    sizes, restored = {}, {}
    for compression in (False, True):
        ckpts = checkpoint_lib.Checkpoints(tmp_path / str(compression), async_save=False, compression=compression)
        ckpts.save(1, state, {"iterator": {"step": 1}})
        ckpts.close()
        sizes[compression] = _state_bytes(tmp_path / str(compression) / "1")
        # Restored by a manager of the other kind: the codec is read from the checkpoint's own metadata.
        other = checkpoint_lib.Checkpoints(tmp_path / str(compression), compression=not compression)
        step, restored[compression], data = other.restore_latest(jax.tree.map(jnp.zeros_like, state))
        other.close()
        assert (step, data) == (1, {"iterator": {"step": 1}})
    assert sizes[False] > 256 * 256 * 4 > 10 * sizes[True], sizes  # raw float32 bytes vs compressed
    for compression in (False, True):
        for a, b in zip(jax.tree.leaves(restored[compression]), jax.tree.leaves(state)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_compression_from_the_config(tmp_path, tfds_data_dir, monkeypatch):
    seen = _record_checkpoints_kwarg(monkeypatch, "compression", False)
    c = config_lib.load_config(TINY)
    config_lib.apply_overrides(c, [f"data.data_dir={tfds_data_dir}", "train.steps=2",
                                   "train.checkpoint_compression=true"])
    loop_lib.prepare_run(c, str(tmp_path / "wd")).ckpts.close()
    assert seen == [True]
    with pytest.raises(config_lib.ConfigError, match="config.train.checkpoint_compression: expected bool"):
        config_lib.apply_overrides(c, ["train.checkpoint_compression=yes"])
