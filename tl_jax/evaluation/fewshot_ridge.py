"""Few-shot evaluation of frozen features by closed-form ridge regression (big_vision's idea).

For each ``shots`` k (default 1, 5, 10, 25) and seed s: from the target's train
split a stratified held-out part (``val_fraction`` of each class, seeded by s:
:func:`tl_jax.data.validation.carve_validation`) is set aside, k examples per
class are drawn from the rest (:func:`tl_jax.data.sample_shots`, seed s), and
ridge regressions onto ±1 one-hot targets are fitted for every L2 value of a grid
(default ``2^-10 ... 2^10``). The L2 value with the best held-out accuracy is
kept and its accuracy on the target's TEST split reported (the test split never
picks anything); ``accuracy`` is the mean over seeds.

The fit (:func:`ridge_fit`), with ``X`` the features centred on the k-shot set and
divided by one scalar, their RMS (:func:`feature_scaling`: the L2 grid then means
the same for features of any scale), and ``T`` the centred targets, so that the
bias is exact and unregularised:

    W(λ) = (XᵀX + λI)⁻¹ XᵀT = Xᵀ (XXᵀ + λI)⁻¹ T,     b = mean(t) − mean(x)·W

One symmetric eigendecomposition of the smaller Gram matrix (``XᵀX`` [D, D] when
N > D, else ``XXᵀ`` [N, N]: primal or dual) gives every λ of the grid at once:
``(G + λI)⁻¹ = Q diag(1/(e + λ)) Qᵀ``. The solve runs in numpy float64, not in a
jitted JAX function: its matrices are at most ``min(N, D)`` square (N = k·C), so
each fit takes milliseconds, while jitting costs one compilation per k (4 shapes:
seconds on a CPU, more than all the fits together), and float64 keeps the small-λ
end of the grid exact.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from tl_jax.data import build_preprocess, load_split
from tl_jax.data.shots import sample_shots
from tl_jax.data.validation import carve_validation
from tl_jax.train import compile_cache
from tl_jax.transferability._threads import one_blas_thread
from tl_jax.transferability.extract import candidate_eval_pp, extract, load_candidate, split_arrays
from tl_jax.transferability.ranking import resolve_target

DEFAULT_SHOTS = (1, 5, 10, 25)
L2_GRID = tuple(float(2.0 ** e) for e in range(-10, 11))


def ridge_fit(x, t, l2s) -> tuple[np.ndarray, np.ndarray]:
    """Ridge ``W [L, D, C]``, ``b [L, C]`` minimising ``‖xW + b − t‖² + λ‖W‖²`` for each λ of ``l2s [L]``.

    numpy float64 (see module doc); ``x`` [N, D], ``t`` [N, C] may be numpy or JAX arrays.
    """
    x, t, l2s = (np.asarray(a, np.float64) for a in (x, t, l2s))
    xm, tm = x.mean(0), t.mean(0)
    xc, tc = x - xm, t - tm
    n, d = x.shape
    if n <= d:  # dual: W = Xᵀ Q diag(1/(e+λ)) Qᵀ T
        e, q = np.linalg.eigh(xc @ xc.T)
        w = np.matmul((xc.T @ q)[None] / (e[None, None] + l2s[:, None, None]), q.T @ tc)  # [L, D, C]
    else:  # primal: W = Q diag(1/(e+λ)) Qᵀ Xᵀ T
        e, q = np.linalg.eigh(xc.T @ xc)
        w = np.matmul(q[None] / (e[None, None] + l2s[:, None, None]), q.T @ (xc.T @ tc))  # [L, D, C]
    b = tm[None] - np.matmul(xm, w)  # [L, C]
    return w, b


def ridge_predict(x, t, evals, l2s) -> list[np.ndarray]:
    """Outputs ``[L, n, C]`` of the ridge fits of ``(x [N, D], t [N, C])`` (as :func:`ridge_fit`) on each
    ``[n, D]`` array of ``evals``, without forming ``W``: with ``G = QΛQᵀ`` the smaller Gram matrix,
    ``x_e W(λ) = P diag(1/(e + λ)) R`` where ``P = x_e Xcᵀ Q, R = QᵀTc`` (dual) or ``P = x_e Q,
    R = Qᵀ Xcᵀ Tc`` (primal): one ``[n, k]`` product per eval set, then one ``[n, k] x [k, L·C]`` product
    with ``[diag(1/(e + λ)) R]_λ`` stacked for every λ."""
    x, t, l2s = (np.asarray(a, np.float64) for a in (x, t, l2s))
    xm, tm = x.mean(0), t.mean(0)
    xc, tc = x - xm, t - tm
    n, d = x.shape
    if n <= d:
        e, q = np.linalg.eigh(xc @ xc.T)
        to_basis, r = xc.T @ q, q.T @ tc  # [D, N], [N, C]
    else:
        e, q = np.linalg.eigh(xc.T @ xc)
        to_basis, r = q, q.T @ (xc.T @ tc)  # [D, D], [D, C]
    scale = 1.0 / (e[None] + l2s[:, None])  # [L, k]
    n_l, (k, c) = len(l2s), r.shape
    r_all = (scale[:, :, None] * r[None]).transpose(1, 0, 2).reshape(k, n_l * c)  # [k, L·C]: diag(s_λ) R
    return [(((np.asarray(v, np.float64) - xm) @ to_basis) @ r_all).reshape(-1, n_l, c).transpose(1, 0, 2) + tm
            for v in evals]


def feature_scaling(xtr) -> tuple[np.ndarray, float]:
    """``(mean [D], s)`` of one k-shot set: features enter the fits as ``(x − mean) / s`` with ``s`` the RMS of
    all centred entries, ``s = sqrt(mean_{n,d} (x_nd − mean_d)²)`` (one scalar for every dimension).

    One scalar makes the L2 grid mean the same for features of any scale (the picks are invariant to
    ``x -> c·x``) while keeping the dimensions' relative scales. Per-dimension standardisation would
    blow up units that fire on only one or two of the k-shot examples (most of a ReLU network's
    features at 1-10 shots): the noise of those units then gets the weight of the strong ones."""
    mean = xtr.mean(0)
    return mean, float(np.sqrt(np.mean((xtr - mean) ** 2))) + 1e-12


def accuracies(xtr, ytr, evals, l2s, num_classes: int) -> list[np.ndarray]:
    """Accuracy ``[L]`` on each ``(x, y)`` of ``evals`` of the ridge fits of one k-shot set ``(xtr, ytr)``
    (features centred and scaled by :func:`feature_scaling` of the k-shot set; targets ±1 one-hot)."""
    mean, s = feature_scaling(xtr)
    t = 2.0 * np.eye(num_classes)[ytr] - 1.0
    outs = ridge_predict((xtr - mean) / s, t, [(x - mean) / s for x, _ in evals], l2s)
    return [(np.argmax(o, -1) == y).mean(-1) for o, (_, y) in zip(outs, evals)]


def check_shots(labels: np.ndarray, shots: Sequence[int], val_fraction: float, name: str,
                key: str = "--shots") -> list[int]:
    """Validated shots; one-line error naming ``key`` when a class has fewer than ``max(shots)`` examples
    outside the held-out part."""
    shots = [int(k) for k in shots]
    if not shots or min(shots) < 1:
        raise ValueError(f"{key} must be integers >= 1, got {shots}")
    classes, counts = np.unique(labels, return_counts=True)
    avail = counts - np.maximum(1, np.round(counts * val_fraction)).astype(int)
    worst = int(np.argmin(avail))
    if max(shots) > avail[worst]:
        raise ValueError(f"{key} {max(shots)} is more than class {int(classes[worst])} of {name} has: "
                         f"{int(avail[worst])} examples outside its held-out part ({int(counts[worst])} in all); "
                         f"lower {key}")
    return shots


def fewshot_eval(train_x, train_y, test_x, test_y, *, shots: Sequence[int] = DEFAULT_SHOTS, seeds: int = 3,
                 l2s: Sequence[float] = L2_GRID, val_fraction: float = 0.2, name: str = "the train split") -> dict:
    """Few-shot ridge accuracies (see module doc).

    Args: train/test features ``[N, D]`` and integer labels ``[N]`` (classes ``0..C-1``).
    Returns ``{"shots": {k: {"accuracy", "std", "per_seed", "l2", "val_accuracy"}}, "seeds", "l2s", "seconds"}``.
    """
    t0 = time.perf_counter()
    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    train_y, test_y = np.asarray(train_y, np.int64), np.asarray(test_y, np.int64)
    if not (np.isfinite(train_x).all() and np.isfinite(test_x).all()):
        raise ValueError("fewshot: the features hold non-finite values (NaN/inf)")
    if isinstance(seeds, bool) or int(seeds) < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    shots = check_shots(train_y, shots, val_fraction, name)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    grid = np.asarray(l2s, np.float64)
    splits = [carve_validation(train_y, val_fraction, seed) for seed in range(seeds)]
    out = {}
    with one_blas_thread():  # once for every fit: looking the BLAS libraries up costs more than a fit
        for k in shots:
            out[k] = _fit_shots(train_x, train_y, test_x, test_y, splits, k, grid, num_classes)
    return {"shots": out, "seeds": int(seeds), "l2s": [float(v) for v in l2s], "seconds": time.perf_counter() - t0}


def _fit_shots(train_x, train_y, test_x, test_y, splits, k: int, grid: np.ndarray, num_classes: int) -> dict:
    """:func:`fewshot_eval`'s entry for ``k`` shots: every seed's split, the L2 value picked on its held-out part."""
    seeds = len(splits)
    val_acc, test_acc = np.zeros((seeds, len(grid))), np.zeros((seeds, len(grid)))
    for seed, (rest, val) in enumerate(splits):
        pick = rest[sample_shots(train_y[rest], k, seed)]
        val_acc[seed], test_acc[seed] = accuracies(train_x[pick], train_y[pick],
                                                   [(train_x[val], train_y[val]), (test_x, test_y)], grid, num_classes)
    best = np.argmax(val_acc, axis=1)  # first (smallest) λ among ties
    per_seed = [float(test_acc[s, best[s]]) for s in range(seeds)]
    return {"accuracy": float(np.mean(per_seed)), "std": float(np.std(per_seed)), "per_seed": per_seed,
            "l2": [float(grid[i]) for i in best], "val_accuracy": [float(val_acc[s, best[s]]) for s in range(seeds)]}


def fewshot_run(workdir: str, target_config, *, shots: Sequence[int] = DEFAULT_SHOTS, seeds: int = 3,
                layer: str = "features", overrides: Sequence[str] = ()) -> dict:
    """:func:`fewshot_eval` of candidate ``workdir``'s ``layer`` on target config's dataset (train split for the
    shots and the held-out part, test split for the accuracy, both after ``config.data.eval_pp``, with the
    normalisation of ``workdir``'s converted weights appended when it has no ``normalize`` op:
    :func:`~tl_jax.transferability.extract.candidate_eval_pp`; the target config's own ``shots`` are not used)."""
    config = resolve_target(target_config, overrides)
    compile_cache.enable(config.compile_cache_dir)
    dc = config.data
    train = load_split(dc.name, dc.train_split, dc.data_dir)
    check_shots(train.labels(), shots, 0.2, f"{dc.name}:{dc.train_split}")
    test = load_split(dc.name, dc.test_split, dc.data_dir)
    cand = load_candidate(workdir, flag="--workdir")  # tl-jax fewshot --workdir: errors name that flag
    # converted weights (or a run from them): their normalisation appended unless eval_pp has its own
    pp = build_preprocess(candidate_eval_pp(dc.eval_pp, workdir, f"--workdir {workdir}"), where="config.data.eval_pp")
    t0 = time.perf_counter()
    feats = {}
    for key, split in (("train", train), ("test", test)):
        arrays = split_arrays(split, None, pp, dc.cache_max_mb)
        feats[key] = (extract(cand, arrays, layer, int(dc.eval_batch_size))[0], arrays["label"])
    extract_s = time.perf_counter() - t0
    result = fewshot_eval(*feats["train"], *feats["test"], shots=shots, seeds=seeds,
                          name=f"{dc.name}:{dc.train_split}")
    return {"workdir": str(workdir), "dataset": dc.name, "layer": layer, "dim": int(feats["train"][0].shape[1]),
            "extract_s": extract_s, **result}
