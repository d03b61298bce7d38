"""``tl-jax rank`` and ``tl-jax fewshot``: which source to transfer from, scored without fine-tuning.

    tl-jax rank --target experiments/mnist_to_digits.py:stage=target,shots=10 \\
        --candidates runs/a runs/b runs/c [--layer features|logits|backbone/conv2] \\
        [--score logme,leep,nce,hscore,hscore_lw,transrate] [--out DIR] [--config.KEY=VALUE ...]
    tl-jax fewshot --workdir runs/a --target experiments/mnist_to_digits.py:stage=target \\
        [--shots 1,5,10,25] [--seeds 3] [--layer features] [--out FILE.json]

``rank`` prints the ranked table (sorted by the first ``--score``) and, with
``--out``, writes ``rank.csv``, ``rank.md`` and ``rank.json`` there
(:mod:`tl_jax.transferability.ranking`). ``fewshot`` prints the closed-form ridge
accuracy per shots (:mod:`tl_jax.evaluation.fewshot_ridge`) and, with ``--out``,
writes it as JSON. ``--config.KEY=VALUE`` overrides apply to the target config.
Neither writes into a candidate's directory.
"""
from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Sequence

from tl_jax.cli.args import split_overrides
from tl_jax.cli.eval_predict import check_output


def _without_step(spec: str) -> str:
    """``PATH[:best|latest|STEP]`` -> ``PATH``."""
    head, sep, tail = spec.rpartition(":")
    return head if sep and head and (tail in ("best", "latest") or tail.isdigit()) else spec


def cmd_rank(argv: Sequence[str]) -> int:
    rest, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(prog="tl-jax rank", description="Rank candidate source models for a target "
                                "dataset by transferability scores (no training).",
                                epilog="Any --config.KEY=VALUE overrides a key of the target config.")
    p.add_argument("--target", required=True, help="the target's config: experiments/FILE.py[:ARG] "
                   "(its data: dataset, train_split, shots, eval_pp)")
    p.add_argument("--candidates", required=True, nargs="+", help="workdirs (PATH[:best|STEP]) or converted "
                   "weights dirs")
    p.add_argument("--layer", default="features", help="features (default: what the head reads) | logits | "
                   "a module path such as backbone/conv2")
    p.add_argument("--score", default="logme,leep,nce,hscore,hscore_lw,transrate",
                   help="comma-separated scores; rows are sorted by the first (default logme,...)")
    p.add_argument("--out", default=None, help="directory for rank.csv, rank.md, rank.json")
    args = p.parse_args(rest)
    # Deferred (JAX): `tl-jax rank --help` runs without it.
    from tl_jax.transferability.ranking import format_table, parse_scores, rank, write_rank

    scores = parse_scores(args.score)
    if args.out:
        out = pathlib.Path(args.out).expanduser().absolute()
        for c in args.candidates:
            for name in ("rank.csv", "rank.md", "rank.json"):
                check_output(out / name, _without_step(c), "--out")  # never into a run's own files
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; give a directory")
    rows = rank(args.target, args.candidates, layer=args.layer, scores=scores, overrides=overrides)
    print(format_table(rows), end="")
    if args.out:
        print("wrote " + ", ".join(str(x) for x in write_rank(rows, args.out)))
    return 0


def cmd_fewshot(argv: Sequence[str]) -> int:
    rest, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(prog="tl-jax fewshot", description="Few-shot accuracy of a run's frozen features "
                                "on a target dataset by closed-form ridge regression (L2 picked on a held-out part "
                                "of the train split, accuracy on the test split).",
                                epilog="Any --config.KEY=VALUE overrides a key of the target config.")
    p.add_argument("--workdir", required=True, help="the run (PATH[:best|STEP]) or a converted weights dir")
    p.add_argument("--target", required=True, help="the target's config: experiments/FILE.py[:ARG]")
    p.add_argument("--shots", default="1,5,10,25", help="comma-separated shots per class (default 1,5,10,25)")
    p.add_argument("--seeds", type=int, default=3, help="draws of the shots per value (default 3)")
    p.add_argument("--layer", default="features", help="features | logits | a module path (default features)")
    p.add_argument("--out", default=None, help="write the result as JSON to this file")
    args = p.parse_args(rest)
    try:
        shots = [int(s) for s in args.shots.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--shots must be comma-separated integers, got {args.shots!r}") from None
    out = check_output(pathlib.Path(args.out), args.workdir, "--out") if args.out else None
    from tl_jax.evaluation.fewshot_ridge import fewshot_run  # deferred (JAX): --help runs without it

    res = fewshot_run(args.workdir, args.target, shots=shots, seeds=args.seeds, layer=args.layer,
                      overrides=overrides)
    for k, r in res["shots"].items():
        print(f"{res['dataset']} {k}-shot: accuracy {r['accuracy']:.4f} ± {r['std']:.4f} over {res['seeds']} seeds "
              f"(L2 {', '.join(f'{v:g}' for v in r['l2'])})")
    print(f"features {res['dim']}-d in {res['extract_s']:.2f} s, ridge over {len(res['shots'])} shots x "
          f"{res['seeds']} seeds x {len(res['l2s'])} L2 values in {res['seconds']:.2f} s")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**res, "shots": {str(k): v for k, v in res["shots"].items()}}, indent=1) + "\n")
        print(f"wrote {out}")
    return 0
