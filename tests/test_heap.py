"""tl_jax/train/gc_freeze.py: the step loop runs with the pre-existing heap frozen out of the garbage collector."""
import gc

from tl_jax import config as config_lib
from tl_jax.parallel import strategy as strategy_lib
from tl_jax.train import loop as loop_lib
from tl_jax.train.gc_freeze import frozen_heap

TINY = "tests/configs/tiny.py"


class _Cycle:
    def __init__(self):
        self.me = self


def test_frozen_heap_freezes_what_exists_and_still_collects_new_cycles():
    assert gc.get_freeze_count() == 0
    alive = _Cycle()  # exists at entry: frozen
    with frozen_heap() as n:
        assert n > 1000 and gc.get_freeze_count() > 1000  # the imports' objects and ours
        assert gc.is_tracked(alive) and not any(alive is o for o in gc.get_objects())  # not in a scanned generation
        _Cycle()  # garbage made inside the block
        assert gc.collect() >= 1  # is still collected
    assert gc.get_freeze_count() == 0
    assert any(alive is o for o in gc.get_objects())


def test_a_callers_own_freeze_is_left_alone():
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        with frozen_heap():
            pass
        assert gc.get_freeze_count() >= before > 0
    finally:
        gc.unfreeze()


def test_the_loop_runs_its_steps_with_the_heap_frozen(tmp_path, tfds_data_dir, monkeypatch):
    counts = []
    compile_ = strategy_lib.JitStrategy.compile

    def recording_compile(self, fn, state, batch):
        compiled = compile_(self, fn, state, batch)

        def step(*args):
            counts.append(gc.get_freeze_count())
            return compiled(*args)

        return step

    monkeypatch.setattr(strategy_lib.JitStrategy, "compile", recording_compile)
    c = config_lib.load_config(TINY)
    config_lib.apply_overrides(c, [f"data.data_dir={tfds_data_dir}", "train.steps=3"])
    loop_lib.train(c, str(tmp_path / "wd"))
    assert len(counts) == 3 and min(counts) > 1000
    assert gc.get_freeze_count() == 0  # and thawed afterwards
