"""Training: the train state, the pure step, the loop, checkpoints, the workdir."""
from tl_jax.train.loop import train
from tl_jax.train.state import TrainState
from tl_jax.train.step import make_eval_step, make_train_step

__all__ = ["train", "TrainState", "make_eval_step", "make_train_step"]
