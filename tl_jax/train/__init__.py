"""Training: the train state, the pure step, the loop, checkpoints, the workdir.

``tl_jax.train.loop.train(config, workdir)`` trains one run (the ``tl-jax train`` command).
The package's ``__init__`` imports nothing, so a module of another package (evaluation,
sweeps) can import one piece of training without importing the whole loop.
"""
