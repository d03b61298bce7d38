"""Feature analysis of domain shift: a t-SNE picture and the proxy A-distance of source vs target features.

The two figures of most domain-adaptation papers (TLlib's ``utils/analysis``), for
the features a run's model gives a source and a target dataset:

* **t-SNE** (scikit-learn's ``TSNE``, PCA init, seeded) of both domains' features
  together, drawn twice side by side: coloured by domain (source / target) and by
  class (markers by domain) -> a PNG (matplotlib, Agg backend).
* **proxy A-distance** (Ben-David et al. 2007; Ganin et al. 2016): a linear domain
  classifier (logistic regression on standardised features, source = 0, target = 1)
  is fitted on ``1 - test_fraction`` of each domain and its error ε read on the
  held-out rest; ``d_A = 2 (1 - 2 ε)``. Both domains are first cut to the same
  size (a seeded draw of the larger), so that chance is ε = 0.5: identical
  distributions give d_A ≈ 0 (slightly below 0 is sampling noise, reported as is),
  perfectly separable ones d_A = 2. A lower d_A after adaptation (DANN vs source
  only) means the domains' features are harder to tell apart.

:func:`run_domains` reads which datasets a run saw from its ``config.json``: the
source is ``config.data`` (its test split, ``eval_pp``); the target is a
domain-adaptation objective's ``target`` (``target_test_split``, ``target_eval_pp``
or ``target_pp``), unless given. ``tl-jax analyze`` (``tl_jax/cli/analyze.py``)
is the command; :func:`write_tensorboard` puts its PNGs and numbers into TensorBoard.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from tl_jax.data import build_preprocess, load_split
from tl_jax.evaluation.linear_probe import fit_logreg, standardise
from tl_jax.train.checkpoint import run_dir
from tl_jax.train.trackers import TensorBoardWriter
from tl_jax.transferability.extract import extract, load_candidate, split_arrays

DOMAIN_L2 = 1e-3  # the domain classifier's L2 (mean-CE form, on standardised features)


def a_distance_from_error(error: float) -> float:
    """The proxy A-distance ``2 (1 - 2 ε)`` of a domain classifier's held-out error ``ε``."""
    return 2.0 * (1.0 - 2.0 * float(error))


def heldout_mask(n: int, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean ``[n]``: ``round(test_fraction * n)`` (at least 1) rows, drawn with ``seed``, are held out."""
    if not 0.0 < test_fraction < 1.0 or n < 2:
        raise ValueError(f"proxy A-distance: test_fraction must be in (0, 1) with >= 2 examples per domain, got "
                         f"{test_fraction!r} with {n}")
    mask = np.zeros(n, bool)
    mask[np.random.default_rng(seed).permutation(n)[:max(1, min(n - 1, round(test_fraction * n)))]] = True
    return mask


def equal_sizes(source: np.ndarray, target: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Both domains cut to the smaller one's size (a seeded draw of the larger's rows, kept in order)."""
    n = min(len(source), len(target))
    r = np.random.default_rng(seed)
    pick = lambda x: x if len(x) == n else x[np.sort(r.choice(len(x), n, replace=False))]  # noqa: E731
    return pick(source), pick(target)


def proxy_a_distance(source: np.ndarray, target: np.ndarray, *, test_fraction: float = 0.2, seed: int = 0,
                     l2: float = DOMAIN_L2) -> dict:
    """``{'a_distance', 'error', 'n_train', 'n_test'}`` of features ``source [Ns, D]`` vs ``target [Nt, D]``
    (see module doc: equal sizes, the same held-out rows of each domain, logistic regression)."""
    source, target = equal_sizes(np.asarray(source), np.asarray(target), seed)
    held = heldout_mask(len(source), test_fraction, seed)
    x = np.concatenate([source, target])
    y = np.concatenate([np.zeros(len(source), np.int64), np.ones(len(target), np.int64)])
    test = np.concatenate([held, held])
    xtr, xte = standardise(x[~test], x[test])
    clf = fit_logreg(xtr, y[~test], l2)
    error = float(np.mean(clf.predict(xte) != y[test]))
    return {"a_distance": a_distance_from_error(error), "error": error, "n_train": int((~test).sum()),
            "n_test": int(test.sum())}


def tsne_embed(features: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """``[N, 2]`` t-SNE of ``features [N, D]`` (scikit-learn, PCA init; perplexity capped below N/3)."""
    from sklearn.manifold import TSNE  # deferred: scikit-learn's manifold module loads slowly

    n = len(features)
    p = float(min(perplexity, max(1.0, (n - 1) / 3.0)))
    return TSNE(n_components=2, perplexity=p, init="pca", random_state=seed).fit_transform(
        np.asarray(features, np.float32))


def plot_tsne(embedding: np.ndarray, domain: np.ndarray, labels: np.ndarray, path: str, title: str = "") -> str:
    """Two panels of ``embedding [N, 2]``: by domain (0 source, 1 target) and by class -> PNG at ``path``."""
    import matplotlib  # deferred: plotting only here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 5))
    colours = 10 if labels.max(initial=0) < 10 else 20  # tab10's colours are the more distinct
    for d, (name, colour, marker) in enumerate((("source", "tab:blue", "o"), ("target", "tab:red", "^"))):
        m = domain == d
        a.scatter(embedding[m, 0], embedding[m, 1], s=6, c=colour, marker=marker, label=name, alpha=0.6)
        b.scatter(embedding[m, 0], embedding[m, 1], s=6, c=labels[m] % colours, cmap=f"tab{colours}", vmin=0,
                  vmax=colours - 1, marker=marker, alpha=0.7)
    a.legend(markerscale=3)
    a.set_title("by domain")
    b.set_title("by class (o source, ^ target)")
    for ax in (a, b):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def analyze_features(source: tuple[np.ndarray, np.ndarray], target: tuple[np.ndarray, np.ndarray], png: str, *,
                     seed: int = 0, title: str = "") -> dict:
    """The proxy A-distance of ``(features, labels)`` of source vs target and their t-SNE PNG at ``png``."""
    res = proxy_a_distance(source[0], target[0], seed=seed)
    feats = np.concatenate([source[0], target[0]])
    domain = np.concatenate([np.zeros(len(source[0]), np.int64), np.ones(len(target[0]), np.int64)])
    labels = np.concatenate([source[1], target[1]]).astype(np.int64)
    plot_tsne(tsne_embed(feats, seed), domain, labels, png,
              f"{title + ': ' if title else ''}proxy A-distance {res['a_distance']:.3f}")
    return {**res, "png": str(png), "n_source": len(source[0]), "n_target": len(target[0])}


def write_tensorboard(logdir: str, results: list[dict]) -> None:
    """Each result's t-SNE PNG as image ``tsne/<tag>`` and its d_A as scalar ``a_distance/<tag>`` (step 0) in
    TensorBoard event files in ``logdir`` (``tag``: the PNG's name after ``tsne_``)."""
    writer = TensorBoardWriter(logdir)
    try:
        for res in results:
            tag = pathlib.Path(res["png"]).stem.removeprefix("tsne_")
            writer.image(f"tsne/{tag}", pathlib.Path(res["png"]))
            writer.scalars(0, {f"a_distance/{tag}": res["a_distance"]})
    finally:
        writer.close()


def run_domains(run: str) -> tuple[dict, dict]:
    """``(source, target)`` dataset specs ``{name, split, pp, data_dir}`` from run ``run``'s ``config.json``
    (target ``None`` fields when the run has no domain-adaptation ``target``)."""
    d = run_dir(run)
    if d is None:
        raise ValueError(f"--runs {run}: no config.json there or up to two levels above (is it a run's workdir?)")
    cfg = json.loads((d / "config.json").read_text())
    data = cfg["data"]
    source = dict(name=data["name"], split=data["test_split"], pp=list(data["eval_pp"]),
                  data_dir=data.get("data_dir") or None)
    group = cfg.get("objective", {}).get(cfg.get("objective", {}).get("name", ""), {}) or {}
    target = dict(name=None, split="test", pp=list(data["eval_pp"]), data_dir=data.get("data_dir") or None)
    if isinstance(group, dict) and group.get("target"):
        target.update(name=group["target"], split=group.get("target_test_split") or "test",
                      pp=list(group.get("target_eval_pp") or group.get("target_pp") or data["eval_pp"]),
                      data_dir=group.get("target_data_dir") or data.get("data_dir") or None)
    return source, target


def domain_features(run: str, spec: dict, *, layer: str = "features", max_points: int = 1000, seed: int = 0,
                    batch_size: int = 256, flag: str = "--source") -> tuple[np.ndarray, np.ndarray]:
    """``(features [n, D], labels [n])`` of run ``run`` on ``spec``'s split (at most ``max_points`` rows, a
    seeded draw, kept in order), after ``spec['pp']`` (which must be deterministic)."""
    pp = build_preprocess(list(spec["pp"]), where=f"{flag} preprocessing")
    if pp.is_random:
        raise ValueError(f"{flag} {spec['name']}: its preprocessing {spec['pp']} is random; give a deterministic "
                         f"one ({flag}-pp)")
    split = load_split(spec["name"], spec["split"], spec.get("data_dir"))
    n = len(split.labels())
    idx = None if n <= max_points else np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    arrays = split_arrays(split, idx, pp, 2048.0)
    feats, _ = extract(load_candidate(run, flag="--runs"), arrays, layer, batch_size)
    return feats, np.asarray(arrays["label"])


def analyze_run(run: str, source: dict, target: dict, out_dir: str, *, layer: str = "features",
                max_points: int = 1000, seed: int = 0, tag: str = "run") -> dict:
    """:func:`analyze_features` of run ``run``'s ``layer`` on the ``source`` and ``target`` specs; the PNG is
    ``out_dir/tsne_<tag>.png``."""
    kw: dict[str, Any] = dict(layer=layer, max_points=max_points, seed=seed)
    src = domain_features(run, source, flag="--source", **kw)
    tgt = domain_features(run, target, flag="--target", **kw)
    png = pathlib.Path(out_dir) / f"tsne_{tag}.png"
    res = analyze_features(src, tgt, str(png), seed=seed,
                           title=f"{tag}: {source['name']}:{source['split']} vs {target['name']}:{target['split']}")
    return {"run": str(run), "source": f"{source['name']}:{source['split']}",
            "target": f"{target['name']}:{target['split']}", "layer": layer, **res}
