"""WiSE-FT: interpolate the pretrained and the fine-tuned weights, ``θ_α = (1 − α)·θ_0 + α·θ_ft``.

Wortsman et al. (CVPR 2022) found that evaluating the weight-space mix of a
model before and after fine-tuning over a grid of ``α`` often beats both ends
(``α = 0`` is the pretrained model, ``α = 1`` the fine-tuned one). Here:

- :func:`interpolate`: the formula over every param the two trees share (same
  '/'-joined path and shape). Params only ``θ_ft`` has, or whose shape differs
  (a head for another number of classes), and those matched by ``keep``
  (regexes; e.g. the run's ``config.dont_load``, a head that was freshly
  initialised rather than loaded) are ``θ_ft``'s: a fresh head has no
  pretrained value to go back to. ``α = 0`` and ``1`` give ``θ_0`` and ``θ_ft``
  exactly (``x·1 + y·0 = x`` in floating point). A LoRA run's ``lora/**/b`` (``config.peft``) has the
  pretrained value 0 (no adaptation), so ``B_α = α·B`` and ``A`` is kept: since the delta ``s·A·B`` is
  linear in ``B``, the merged kernel is ``(1 − α)·W_0 + α·(W_ft + s·A·B)``, WiSE-FT of the merged weights.
  Likewise a bottleneck adapter's ``adapter/**/up/{kernel,bias}`` have the pretrained value 0 (the identity)
  and ``down`` is kept, so each adapter adds ``α·(act(h·W_down + b_down)·W_up + b_up)``: its residual scaled by
  ``α`` (``α = 0``: the base model). Prompt tokens (``prompt/**``) have no pretrained value and stay ``θ_ft``'s.
- :func:`wise_ft`: each ``α`` of a grid evaluated on the fine-tuned run's test
  split (:func:`tl_jax.evaluation.saved_run.evaluate_run`), written as ``wise_ft.csv`` and a
  curve ``wise_ft.png``; ``tl-jax interpolate`` (:mod:`tl_jax.cli.interpolate`) runs it from the command line.
  BatchNorm running statistics, where both have them, are interpolated like
  the params.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from tl_jax.evaluation import saved_run as eval_lib
from tl_jax.peft.adapters import ADAPTER
from tl_jax.peft.lora import LORA
from tl_jax.train.checkpoint import load_variables
from tl_jax.util.tree_paths import flatten_paths, path_str

PyTree = Any


def check_alpha(alpha: Any, where: str = "alpha") -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha):
        raise ValueError(f"{where} must be a finite number (0 = pretrained, 1 = fine-tuned), got {alpha!r}")
    return float(alpha)


def interpolate(theta0: PyTree, theta_ft: PyTree, alpha: float, keep: Sequence[str] = ()) -> PyTree:
    """``(1 − α)·θ_0 + α·θ_ft`` leaf by leaf, as a tree like ``theta_ft`` (in its dtypes); see the module doc."""
    alpha = check_alpha(alpha)
    base = flatten_paths(theta0)
    patterns = [re.compile(p) for p in keep]

    def mix(path, ft):
        name = path_str(path)
        t0 = base.get(name)
        if t0 is None and (name.startswith(f"{LORA}/") and name.endswith("/b") or  # module doc: B's and an
                           name.startswith(f"{ADAPTER}/") and "/up/" in name):  # adapter's up's pretrained value
            t0 = np.zeros(np.shape(ft), np.asarray(ft).dtype)
        if t0 is None or np.shape(t0) != np.shape(ft) or any(p.fullmatch(name) for p in patterns):
            return ft
        ft_ = np.asarray(ft)
        out = (1.0 - alpha) * np.asarray(t0, ft_.dtype) + alpha * ft_
        return out.astype(ft_.dtype)

    return jax.tree_util.tree_map_with_path(mix, theta_ft)


def parse_alphas(text: str) -> list[float]:
    """``'0,0.25,0.5'`` -> ``[0.0, 0.25, 0.5]`` (one-line error naming ``--alphas``)."""
    try:
        alphas = [float(a) for a in str(text).split(",") if a.strip()]
    except ValueError:
        raise ValueError(f"--alphas must be comma-separated numbers such as 0,0.25,0.5,0.75,1, got {text!r}") from None
    if not alphas or not all(np.isfinite(alphas)):
        raise ValueError(f"--alphas must be comma-separated finite numbers such as 0,0.5,1, got {text!r}")
    return alphas


def wise_ft(pretrained: str | None, finetuned: str, alphas: Sequence[float], out_dir: str | pathlib.Path,
            checkpoint: str | int = "latest", split: str | None = None) -> list[dict]:
    """Evaluate ``θ_α`` for each ``α`` on the fine-tuned run's test split (``split='val'``: its validation set,
    to choose α; any other split of its dataset by name); write ``wise_ft.csv``/``.png``/``.json``.

    ``pretrained``: a workdir or checkpoint (``PATH[:best|latest|STEP]``); ``None``: the fine-tuned run's
    ``config.init_from``. Params matching its ``config.dont_load`` keep their fine-tuned values. Returns one
    row per ``α``: ``{"alpha", "step", "count", <metric>: value}``.
    """
    alphas = [check_alpha(a, "--alphas") for a in alphas]
    out = pathlib.Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")
    run = eval_lib.load(finetuned, checkpoint)
    source = pretrained or run.config.init_from
    if not source:
        raise ValueError(f"--pretrained is needed: the run {run.workdir} has no config.init_from")
    theta0 = load_variables(source, where="--pretrained")
    keep = list(run.config.dont_load)
    rows = []
    for alpha in alphas:
        state = run.state.replace(params=interpolate(theta0["params"], jax.device_get(run.state.params), alpha, keep))
        if run.state.batch_stats and "batch_stats" in theta0:
            state = state.replace(batch_stats=interpolate(theta0["batch_stats"],
                                                          jax.device_get(run.state.batch_stats), alpha, keep))
        res = eval_lib.evaluate_run(finetuned, checkpoint, split=split, run=dataclasses.replace(run, state=state))
        rows.append({"alpha": alpha, "step": res["step"], "count": res["count"], **res["metrics"]})
    write_curve(rows, out, title=f"WiSE-FT: {pathlib.Path(source).name} -> {run.workdir.name}")
    return rows


def write_curve(rows: list[dict], out: pathlib.Path, title: str = "WiSE-FT") -> None:
    """``out/wise_ft.csv``, ``out/wise_ft.json`` and ``out/wise_ft.png`` (each metric against α)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    with open(out / "wise_ft.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (out / "wise_ft.json").write_text(json.dumps(rows, indent=2) + "\n")
    metrics = [k for k in keys if k not in ("alpha", "step", "count")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        ax.plot([r["alpha"] for r in rows], [r[m] for r in rows], "o-")
        ax.set_xlabel("α (0 = pretrained, 1 = fine-tuned)")
        ax.set_ylabel(f"test/{m}")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "wise_ft.png", dpi=100)
    plt.close(fig)

