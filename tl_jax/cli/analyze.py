"""``tl-jax analyze``: t-SNE and proxy A-distance of a run's source vs target features.

    tl-jax analyze --runs runs/da/source_only_seed0 runs/da/dann_seed0 --out runs/da/analysis \\
        [--source NAME[:SPLIT]] [--target NAME[:SPLIT]] [--source-pp JSON] [--target-pp JSON] \\
        [--data-dir DIR] [--layer features] [--max-points 1000] [--seed 0] [--no-tensorboard]

For each run (a workdir, ``PATH[:best|STEP]``): its ``layer`` features of at most
``--max-points`` examples of the source and of the target split, then
``OUT/tsne_<i>_<run>.png`` (coloured by domain and by class) and the proxy
A-distance (:mod:`tl_jax.evaluation.domain_analysis`), printed and written with
the rest to ``OUT/analysis.json``; the PNGs and the numbers also go into a TensorBoard
event file in ``OUT`` (``--no-tensorboard``: not).

Which datasets: by default what the run saw, from its ``config.json``: the source
is ``config.data`` (its ``test_split``, ``eval_pp``), the target the
domain-adaptation objective's ``target`` (``target_test_split``, ``target_eval_pp``
or ``target_pp``). ``--source`` / ``--target`` name another dataset and split
(``NAME[:SPLIT]``, split default ``test``), still preprocessed the run's way for that
domain unless ``--source-pp`` / ``--target-pp`` give a JSON list of ops.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
from collections.abc import Sequence

from tl_jax.cli.args import json_arg
from tl_jax.cli.eval_predict import check_output


def _spec(text: str | None, pp_json: str | None, base: dict, flag: str) -> dict:
    """``base`` with ``NAME[:SPLIT]`` (``text``) and a JSON op list (``pp_json``) applied."""
    spec = dict(base)
    if text:
        name, _, split = text.partition(":")
        spec.update(name=name, split=split or "test")
    if pp_json:
        spec["pp"] = json_arg(pp_json, list, f"{flag}-pp must be a JSON list of preprocessing ops")
    if not spec.get("name"):
        raise ValueError(f"{flag}: the run has no domain-adaptation target in its config.json; name one: "
                         f"{flag} NAME[:SPLIT]")
    return spec


def _tag(i: int, run: str) -> str:
    return f"{i}_" + re.sub(r"[^A-Za-z0-9._-]", "_", pathlib.Path(run.split(":")[0]).name or "run")


def cmd_analyze(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="tl-jax analyze", description="t-SNE (PNG) and proxy A-distance of runs' "
                                "features on a source vs a target dataset.")
    p.add_argument("--runs", required=True, nargs="+", help="one or more workdirs (PATH[:best|STEP])")
    p.add_argument("--out", required=True, help="directory for tsne_*.png and analysis.json")
    p.add_argument("--source", default=None, help="NAME[:SPLIT] (default: the run's config.data, its test split)")
    p.add_argument("--target", default=None, help="NAME[:SPLIT] (default: the run's domain-adaptation target)")
    p.add_argument("--source-pp", default=None, help="JSON list of preprocessing ops for the source")
    p.add_argument("--target-pp", default=None, help="JSON list of preprocessing ops for the target")
    p.add_argument("--data-dir", default=None, help="tfds data_dir of both datasets (default: the run's)")
    p.add_argument("--layer", default="features", help="features | logits | a module path (default features)")
    p.add_argument("--max-points", type=int, default=1000, help="examples per domain (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="draws of the examples, the held-out part, t-SNE")
    p.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event file in --out (default: "
                   "the PNGs as images tsne/<tag>, d_A as scalars a_distance/<tag>)")
    args = p.parse_args(argv)
    if args.max_points < 4:
        raise ValueError(f"--max-points must be >= 4, got {args.max_points}")
    out = pathlib.Path(args.out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")
    tags = [_tag(i, r) for i, r in enumerate(args.runs)]
    for run, tag in zip(args.runs, tags):
        for name in (f"tsne_{tag}.png", "analysis.json"):
            check_output(out / name, run.split(":")[0], "--out")  # never into a run's own files
    # Deferred (JAX, scikit-learn): `tl-jax analyze --help` runs without them.
    from tl_jax.evaluation.domain_analysis import analyze_run, run_domains, write_tensorboard

    results = []
    for run, tag in zip(args.runs, tags):
        base_src, base_tgt = run_domains(run)
        src = _spec(args.source, args.source_pp, base_src, "--source")
        tgt = _spec(args.target, args.target_pp, base_tgt, "--target")
        if args.data_dir:
            src["data_dir"] = tgt["data_dir"] = args.data_dir
        out.mkdir(parents=True, exist_ok=True)
        res = analyze_run(run, src, tgt, str(out), layer=args.layer, max_points=args.max_points, seed=args.seed,
                          tag=tag)
        print(f"{run}: {res['source']} vs {res['target']} ({res['n_source']} + {res['n_target']} examples, "
              f"{args.layer}): proxy A-distance {res['a_distance']:.4f} (domain classifier error {res['error']:.4f}"
              f" on {res['n_test']}); t-SNE {res['png']}")
        results.append(res)
    (out / "analysis.json").write_text(json.dumps({"runs": results}, indent=1) + "\n")
    print(f"wrote {out / 'analysis.json'}")
    if not args.no_tensorboard:
        write_tensorboard(str(out), results)
        print(f"wrote TensorBoard events into {out} (tensorboard --logdir {out})")
    return 0
