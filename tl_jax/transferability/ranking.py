"""Rank candidate source models for a target dataset by transferability scores (``tl-jax rank``).

For a target config (its ``config.data``: dataset, ``train_split``, ``shots``,
``eval_pp``) the training examples are read and preprocessed once per pipeline
(:func:`tl_jax.transferability.extract.target_arrays`: a candidate from converted
weights reads ``eval_pp`` with the weights' normalisation appended when it has no
``normalize`` op, :func:`~tl_jax.transferability.extract.candidate_eval_pp`); then, per candidate, one
batched jitted forward gives the chosen layer's features and the candidate's logits
(:func:`~tl_jax.transferability.extract.extract`), and each requested score of
:data:`tl_jax.transferability.SCORES` is computed from them: features for
LogME / H-score / TransRate, ``softmax(logits)`` for LEEP, ``argmax(logits)`` (the
source labels) for NCE. Rows are sorted by the FIRST score, best first.

Every candidate is loaded and checked (its layer, its inputs) before any features
are extracted, so a bad candidate fails in one line before the work starts.
Nothing is written into the candidates' directories.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from tl_jax import config as config_lib
from tl_jax.transferability import DEFAULT_SCORES, SCORES
from tl_jax.transferability._threads import one_blas_thread
from tl_jax.transferability.extract import (INPUT_KEYS, candidate_eval_pp, check_layer, extract, load_candidate,
                                            target_arrays)

log = logging.getLogger("tl_jax")
OUT_FILES = ("rank.csv", "rank.md", "rank.json")


def parse_scores(scores: str | Sequence[str]) -> list[str]:
    """``'logme,leep'`` or a list -> validated score names (one-line error naming the unknown one)."""
    names = [s.strip() for s in scores.split(",")] if isinstance(scores, str) else [str(s) for s in scores]
    names = [s for s in names if s]
    bad = [s for s in names if s not in SCORES]
    if bad or not names:
        raise ValueError(f"--score {','.join(bad) or '(empty)'}: unknown score; known: {', '.join(SCORES)}")
    return list(dict.fromkeys(names))


def resolve_target(target: Any, overrides: Sequence[str] = ()) -> Any:
    """A target ``ConfigDict`` from a config (returned as is) or a ``CONFIG_SPEC`` string (+ overrides)."""
    if isinstance(target, str):
        return config_lib.apply_overrides(config_lib.load_config(target), overrides)
    return target


def score_candidate(features: np.ndarray, logits: np.ndarray | None, labels: np.ndarray,
                    scores: Sequence[str]) -> dict[str, float]:
    """``{score: value}`` of one candidate's extracted arrays (see module doc for which array each reads)."""
    out = {}
    for name in scores:
        kind, fn = SCORES[name]
        if kind == "features":
            out[name] = fn(features, labels)
        elif kind == "probs":
            z = logits - logits.max(1, keepdims=True)
            p = np.exp(z.astype(np.float64))
            out[name] = fn(p / p.sum(1, keepdims=True), labels)
        else:
            out[name] = fn(logits.argmax(1), labels)
    return out


def rank(target_config: Any, candidates: Sequence[str], *, layer: str = "features",
         scores: str | Sequence[str] = DEFAULT_SCORES, overrides: Sequence[str] = ()) -> list[dict]:
    """Score every candidate on the target's training examples; rows sorted by the first score.

    Returns one dict per candidate: ``rank`` (1 = best by the first score),
    ``candidate`` (its path as given), ``layer``, ``dim`` (feature size), ``examples``,
    ``classes`` (target), ``source_classes``, one value per score, ``extract_s`` and
    ``score_s`` (seconds), plus ``rank_<score>`` (its rank by each score).
    """
    if not candidates:
        raise ValueError("--candidates: name at least one workdir or weights dir")
    from tl_jax.train import compile_cache  # lazy: tl_jax.train imports the objectives

    names = parse_scores(scores)
    config = resolve_target(target_config, overrides)
    compile_cache.enable(config.compile_cache_dir)  # a candidate architecture's forward compiles once per machine
    t0 = time.perf_counter()
    pipelines, loaded = {}, []  # pipeline (JSON) -> its arrays; a candidate's own normalisation: its own arrays
    for path in candidates:  # all loaded and checked before any extraction
        cand = load_candidate(path)
        pp = candidate_eval_pp(config.data.eval_pp, path)
        key = json.dumps(pp, sort_keys=True)
        if key not in pipelines:
            pipelines[key] = target_arrays(config, pp)
        arrays = pipelines[key]
        if not loaded:
            labels = np.asarray(arrays["label"], np.int64)
            classes = len(np.unique(labels))
            if classes < 2:
                raise ValueError(f"target {config.data.name}:{config.data.train_split} (config.data.shots="
                                 f"{config.data.shots}) has {classes} class(es): the scores need at least 2")
        check_layer(cand, layer, {k: v[:1] for k, v in arrays.items() if k in INPUT_KEYS})
        if cand.num_classes == 0 and any(SCORES[s][0] != "features" for s in names):
            need = [s for s in names if SCORES[s][0] != "features"]
            raise ValueError(f"--candidates {path} has no head: scores {need} need its logits; drop them from --score")
        loaded.append((cand, arrays))
    log.info("rank: %d target examples of %s (%d classes, %d pipeline(s)) in %.2f s", len(labels), config.data.name,
             classes, len(pipelines), time.perf_counter() - t0)
    rows = []
    for cand, arrays in loaded:
        t1 = time.perf_counter()
        feats, logits = extract(cand, arrays, layer, int(config.data.eval_batch_size))
        t2 = time.perf_counter()
        with one_blas_thread():
            values = score_candidate(feats, logits, labels, names)
        rows.append({"candidate": cand.path, "layer": layer, "dim": int(feats.shape[1]), "examples": len(labels),
                     "classes": classes, "source_classes": cand.num_classes, **values,
                     "extract_s": t2 - t1, "score_s": time.perf_counter() - t2})
        log.info("rank: %s %s", cand.path, " ".join(f"{k}={v:.4f}" for k, v in values.items()))
    for name in names:
        order = sorted(range(len(rows)), key=lambda i: -_key(rows[i][name]))
        for r, i in enumerate(order, 1):
            rows[i][f"rank_{name}"] = r
    rows.sort(key=lambda r: r[f"rank_{names[0]}"])
    for r in rows:
        r["rank"] = r[f"rank_{names[0]}"]
    return rows


def _key(v: float) -> float:
    return -math.inf if v is None or not math.isfinite(v) else float(v)


def score_names(rows: list[dict]) -> list[str]:
    return [k for k in rows[0] if k in SCORES] if rows else []


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """The ranked table (rank, candidate, layer, dim, scores, seconds) as text or markdown."""
    names = score_names(rows)
    header = ["rank", "candidate", "layer", "dim", *names, "seconds"]
    body = [[str(r["rank"]), r["candidate"], r["layer"], str(r["dim"]), *(f"{r[n]:.4f}" for n in names),
             f"{r['extract_s'] + r['score_s']:.2f}"] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body]) + "\n"
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header)] + [fmt(b) for b in body]) + "\n"


def write_rank(rows: list[dict], out: str | pathlib.Path) -> list[pathlib.Path]:
    """``rank.csv``, ``rank.md`` and ``rank.json`` of ``rows`` into directory ``out`` (created)."""
    out = pathlib.Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f for f in OUT_FILES]
    with open(paths[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    paths[1].write_text(format_table(rows, markdown=True))
    paths[2].write_text(json.dumps(rows, indent=1) + "\n")
    return paths
