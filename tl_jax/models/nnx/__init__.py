"""Flax NNX: the bridge to the path-keyed machinery and the zoo's NNX twins."""
