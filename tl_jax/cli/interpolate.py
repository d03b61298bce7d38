"""``tl-jax interpolate``: WiSE-FT, the pretrained and fine-tuned weights mixed over a grid of α.

    tl-jax interpolate --finetuned W1 [--pretrained W0] --alphas 0,0.5,1 --out DIR [--split val]

Evaluates ``(1 - α)·θ_0 + α·θ_ft`` for each α on the fine-tuned run's test split
(or ``--split``) and writes ``wise_ft.csv``, ``wise_ft.json`` and ``wise_ft.png``
into ``--out`` (:mod:`tl_jax.params.interpolate`).
"""
from __future__ import annotations

import argparse
import pathlib
from collections.abc import Sequence


def interpolate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tl-jax interpolate",
                                description="WiSE-FT: evaluate (1-a)*pretrained + a*fine-tuned weights over a grid of a "
                                            "on the fine-tuned run's test split; writes a CSV and a curve plot.")
    p.add_argument("--finetuned", required=True, help="the fine-tuned run's workdir")
    p.add_argument("--pretrained", default=None, help="workdir or checkpoint (PATH[:best|latest|STEP]); default: "
                                                      "the fine-tuned run's config.init_from")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="comma-separated α values")
    p.add_argument("--checkpoint", default="latest", help="the fine-tuned run's step: latest | best | STEP")
    p.add_argument("--split", default=None, help="default: the run's test split; val: its validation set (choose α "
                                                 "there, not on test); or another split of its dataset")
    p.add_argument("--out", required=True, help="directory for wise_ft.csv, wise_ft.json, wise_ft.png")
    return p


def cmd_interpolate(argv: Sequence[str]) -> int:
    args = interpolate_parser().parse_args(list(argv))
    # Deferred (JAX): `tl-jax interpolate --help` runs without it.
    from tl_jax.params.interpolate import parse_alphas, wise_ft

    checkpoint = int(args.checkpoint) if str(args.checkpoint).isdigit() else args.checkpoint
    rows = wise_ft(args.pretrained, args.finetuned, parse_alphas(args.alphas), args.out, checkpoint, args.split)
    for r in rows:
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    print(f"wrote {pathlib.Path(args.out) / 'wise_ft.csv'} and wise_ft.png")
    return 0
