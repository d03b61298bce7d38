"""``tl-jax eval`` and ``tl-jax predict``: a saved run on a split, an image folder or a CSV.

    tl-jax eval --workdir W [--checkpoint latest|best|STEP] [--dataset NAME] [--split S] [--data-dir D]
                [--config.data.eval_pp=JSON] [--out FILE.json]
    tl-jax predict --workdir W [--checkpoint ...] (--split S [--dataset NAME] | --image-folder DIR | --csv FILE)
                   --out PREFIX

``eval`` prints the metrics and writes them as JSON (default
``W/eval/<dataset>_<split>_<checkpoint>.json``); ``predict`` writes ``PREFIX.npz``
(``pred``, ``probs``, ``label`` when known, ``index`` or ``path``) and ``PREFIX.csv``
(one row per example). Neither writes anything else; the run's own files
(``config.json``, ``metrics.jsonl``, ``summary.json``, ``checkpoints/``) are never
touched, and an output path naming one of them is refused. Every check runs before
the first file is written. JAX is imported inside the commands (their --help runs without it).
"""
from __future__ import annotations

import argparse
import csv
import json
import pathlib
import re
from collections.abc import Sequence

from tl_jax.cli.args import split_overrides
from tl_jax.train.workdir import OWNED  # the run's own files, never written by eval/predict


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, help="a run's workdir (config.json + checkpoints/)")
    p.add_argument("--checkpoint", default="latest",
                   help="latest (default) | best (by the run's config.train.best_metric) | a step number")
    p.add_argument("--dataset", default=None, help="dataset name (default: the run's config.data.name)")
    p.add_argument("--split", default=None, help="split, e.g. test or train[:10%%]; val: the run's own "
                   "validation set (config.data.val_fraction / val_split)")
    p.add_argument("--data-dir", default=None, help="tfds data dir (default: the run's config.data.data_dir)")


def eval_pp_override(overrides: Sequence[str], prog: str) -> str | None:
    """The JSON of ``--config.data.eval_pp=JSON`` (the only config override these commands take)."""
    value = None
    for body in overrides:
        key, _, raw = body.partition("=")
        if key != "data.eval_pp":
            raise ValueError(f"{prog} takes only --config.data.eval_pp=JSON overrides, got --config.{key}")
        value = raw
    return value


def check_output(path: pathlib.Path, workdir: str, flag: str) -> pathlib.Path:
    """Refuse an output path that is (or is inside) one of the run's own files."""
    path = path.expanduser().absolute()
    wd = pathlib.Path(workdir).expanduser().absolute()
    for name in OWNED:
        owned = wd / name
        if path == owned or owned in path.parents:
            raise ValueError(f"{flag} {path} would overwrite the run's {name}; choose another path")
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file path")
    return path


def default_eval_path(workdir: str, dataset: str, split: str, checkpoint: str) -> pathlib.Path:
    """``W/eval/<dataset>_<split>_<checkpoint>.json`` (characters other than ``[A-Za-z0-9._-]`` -> ``_``)."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", f"{dataset}_{split}_{checkpoint}")
    return pathlib.Path(workdir).expanduser().absolute() / "eval" / f"{stem}.json"


def cmd_eval(argv: Sequence[str]) -> int:
    rest, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(prog="tl-jax eval", description="Evaluate a saved run's checkpoint on a whole split.",
                                epilog="--config.data.eval_pp=JSON replaces the run's eval preprocessing.")
    _common(p)
    p.add_argument("--out", default=None, help="metrics JSON (default W/eval/<dataset>_<split>_<checkpoint>.json)")
    args = p.parse_args(rest)
    eval_pp = eval_pp_override(overrides, "tl-jax eval")
    out = check_output(pathlib.Path(args.out), args.workdir, "--out") if args.out else None
    from tl_jax.evaluation import saved_run as evaluate  # deferred (JAX): --help and the checks run without it

    result = evaluate.evaluate_run(args.workdir, args.checkpoint, dataset=args.dataset, split=args.split,
                                   data_dir=args.data_dir, eval_pp=eval_pp)
    out = out or default_eval_path(args.workdir, result["dataset"], result["split"], args.checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    metrics = " ".join(f"{k}={v:.6f}" for k, v in sorted(result["metrics"].items()))
    print(f"{result['dataset']}:{result['split']} step {result['step']} ({args.checkpoint}), "
          f"{result['count']} examples: {metrics}")
    print(f"wrote {out}")
    return 0


def write_predictions(prefix: pathlib.Path, out: dict) -> tuple[pathlib.Path, pathlib.Path]:
    """``PREFIX.npz`` and ``PREFIX.csv`` of :func:`tl_jax.evaluation.saved_run.predict`'s output."""
    import numpy as np

    id_key = "path" if "path" in out else "index"
    arrays = {"pred": out["pred"], "probs": out["probs"], id_key: out[id_key]}
    if out["label"] is not None:
        arrays["label"] = out["label"]
    npz, table = prefix.with_name(prefix.name + ".npz"), prefix.with_name(prefix.name + ".csv")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    np.savez(npz, **arrays)
    names = out["class_names"]
    header = [id_key] + (["label"] if out["label"] is not None else []) + ["pred"] + \
        (["pred_class"] if names else []) + ["prob"]
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i in range(len(out["pred"])):
            pred = int(out["pred"][i])
            row = [out[id_key][i]] + ([int(out["label"][i])] if out["label"] is not None else []) + [pred] + \
                ([names[pred] if pred < len(names) else ""] if names else []) + [repr(float(out["probs"][i].max()))]
            w.writerow(row)
    return npz, table


def cmd_predict(argv: Sequence[str]) -> int:
    rest, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(prog="tl-jax predict", description="Per-example predictions of a saved run.",
                                epilog="Exactly one input: --split (with optional --dataset), --image-folder or "
                                       "--csv. --config.data.eval_pp=JSON replaces the run's eval preprocessing.")
    _common(p)
    p.add_argument("--image-folder", default=None, help="images, flat (unlabelled) or in class sub-folders")
    p.add_argument("--csv", default=None, help="a CSV of texts (column --text-column, optional --label-column)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json for --csv (default: the run's dataset's)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.npz and PREFIX.csv")
    args = p.parse_args(rest)
    eval_pp = eval_pp_override(overrides, "tl-jax predict")
    if args.dataset and args.split is None:
        raise ValueError("--dataset needs --split")
    prefix = pathlib.Path(args.out).expanduser().absolute()
    for suffix in (".npz", ".csv"):
        check_output(prefix.with_name(prefix.name + suffix), args.workdir, "--out")
    from tl_jax.evaluation import saved_run as evaluate  # deferred (JAX): --help and the checks run without it

    out = evaluate.predict(args.workdir, args.checkpoint, split=args.split, dataset=args.dataset,
                           data_dir=args.data_dir, image_folder=args.image_folder, csv=args.csv,
                           tokenizer=args.tokenizer, text_column=args.text_column, label_column=args.label_column,
                           eval_pp=eval_pp)
    npz, table = write_predictions(prefix, out)
    known = out["label"] is not None and (out["label"] >= 0).any()
    acc = f", accuracy {float((out['pred'] == out['label'])[out['label'] >= 0].mean()):.4f}" if known else ""
    print(f"{len(out['pred'])} predictions (step {out['step']}){acc}; wrote {npz} and {table}")
    return 0
