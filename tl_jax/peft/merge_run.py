"""``tl-jax weights merge``: a LoRA run's checkpoint folded into a plain checkpoint (docs/peft.md).

    tl-jax weights merge --workdir RUN [--checkpoint latest|best|STEP] --out DIR [--overwrite]

``DIR`` holds the base model's params with every LoRA pair folded in, ``W' = W + s·A·B``
(:func:`tl_jax.peft.lora.merge_lora`), and the run's BatchNorm statistics: a checkpoint that
``config.init_from`` loads into the model without ``config.peft`` and that predicts the run's logits.
Runs with adapters or prompt tokens (``config.peft.adapter``/``prompt``) are refused with one line: those add
computation to the model and cannot be folded into its weights.

:func:`folded` does the same in memory for readers that build the plain model from a run's
``config.model`` (``tl-jax rank``/``fewshot``: ``tl_jax/transferability/extract.py``).
"""
from __future__ import annotations

import json
import pathlib

from tl_jax import config as config_lib
from tl_jax import peft as peft_lib
from tl_jax.peft.lora import lora_pairs
from tl_jax.train.checkpoint import load_variables, run_dir
from tl_jax.weights.convert import save_variables


def run_config(workdir: str | pathlib.Path):
    """The run's config from ``workdir/config.json`` (one line naming ``--workdir`` when absent)."""
    f = pathlib.Path(workdir).expanduser() / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"--workdir {workdir}: no config.json (not a tl-jax run)")
    return config_lib.from_dict(json.loads(f.read_text()))


def merge_run(workdir: str | pathlib.Path, out: str | pathlib.Path, checkpoint: str | int = "latest", *,
              overwrite: bool = False) -> dict:
    """Write ``out``: the run's ``checkpoint`` with LoRA folded into the base (module doc); returns a summary
    ``{'out', 'merged_layers', 'lora_params', 'params'}``."""
    config = run_config(workdir)
    unfoldable = [k for k in peft_lib.active_keys(config) if k != peft_lib.LORA]
    if unfoldable:
        raise ValueError(f"--workdir {workdir}: the run has config.peft.{unfoldable[0]} params, which add computation "
                         f"and cannot be folded into the base weights (no merge); read the run itself with "
                         f"tl-jax eval/predict (docs/peft.md)")
    if not peft_lib.enabled(config):
        raise ValueError(f"--workdir {workdir}: the run has no LoRA (config.peft.lora.rank = 0): nothing to merge")
    variables = load_variables(f"{workdir}:{checkpoint}", where="--workdir")
    lora = variables["params"][peft_lib.LORA]
    merged = peft_lib.merge(variables["params"], config)
    save_variables(pathlib.Path(out), {**variables, "params": merged}, overwrite=overwrite)
    return {"out": str(out), "merged_layers": len(lora_pairs(lora)),
            "lora_params": peft_lib.count(lora), "params": peft_lib.count(merged)}


def folded(variables: dict, path: str, where: str) -> dict:
    """``variables`` read from run ``path`` (``PATH[:best|STEP]``, its step or checkpoints dir) with their LoRA
    folded into the base when the params have a ``lora`` subtree (exact: the plain model then computes what
    the LoRA run does); as they are otherwise. Errors name ``where``; adapter and prompt params (which cannot be
    folded) are refused with one line rather than silently dropped."""
    unfoldable = [k for k in (peft_lib.ADAPTER, peft_lib.PROMPT) if k in variables["params"]]
    if unfoldable:
        raise ValueError(f"{where}: its params have a {unfoldable[0]!r} subtree (config.peft.{unfoldable[0]}), which "
                         f"cannot be folded into the plain model this reads (docs/peft.md)")
    if peft_lib.LORA not in variables["params"]:
        return variables
    d = run_dir(path)
    if d is not None:
        return {**variables, "params": peft_lib.merge(variables["params"], run_config(d))}
    raise ValueError(f"{where}: its params have a {peft_lib.LORA!r} subtree but no run config.json is there or up "
                     f"to two levels above it (the LoRA scale is config.peft.lora's)")
