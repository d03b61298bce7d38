"""Benchmarks of tl_jax (``make bench`` = ``python -m benchmarks.run``, which writes BENCHMARKS.md).

Modules: ``overhead_bench`` (loop vs hand-written jit loop), ``conv_bench`` (CPU
convolution gap vs PyTorch eager), ``cache_bench`` (feature cache, input
pipeline), ``compile_bench`` (persistent compile cache), ``memory_bench``
(optimizer state, demo peak RSS), ``gpu_bench`` (ResNet-50 MFU),
``parallel_bench`` and ``sweep_bench``; ``report`` renders the markdown.
Benchmarks are not tests: nothing here asserts a timing.
"""
