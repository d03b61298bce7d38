"""``tl-jax weights convert|inspect|merge``: bring your own weights (safetensors, PyTorch, npz), fold LoRA in.

    tl-jax weights inspect model.safetensors
    tl-jax weights convert --from model.safetensors --mapping bert --model bert --out pretrained/minilm \\
        --ignore 'pooler\\..*'
    tl-jax weights convert --from path/to/hf_model_folder --out pretrained/dinov2   # recognised: no --mapping
    tl-jax weights merge --workdir runs/lora --out pretrained/merged   # LoRA folded in (tl_jax/peft/merge_run.py)

``convert`` writes a checkpoint dir usable as ``config.init_from`` (:mod:`tl_jax.weights`).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from tl_jax.cli.args import action_parser, json_arg

ACTIONS = {"convert": "a weights file as a checkpoint for config.init_from",
           "inspect": "list a weights file's tensors: name, shape, dtype",
           "merge": "fold a LoRA run's adapters into its base weights: a plain checkpoint for config.init_from"}


def weights_parser() -> argparse.ArgumentParser:
    """``tl-jax weights ACTION ...`` (ACTION: ``convert`` | ``inspect`` | ``merge``); ``--help`` lists the actions."""
    return action_parser("tl-jax weights", "Bring your own weights.", ACTIONS)


def inspect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tl-jax weights inspect", description="List a weights file's tensors.")
    p.add_argument("file", help=".safetensors, .pt/.pth/.bin, .npz")
    return p


def merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tl-jax weights merge",
                                description="Fold a LoRA run's adapters into its base weights (docs/peft.md).")
    p.add_argument("--workdir", required=True, help="the LoRA run's workdir (config.peft.lora.rank > 0)")
    p.add_argument("--checkpoint", default="latest", help="latest | best | STEP")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint dir to write (config.init_from)")
    p.add_argument("--overwrite", action="store_true")
    return p


def convert_parser(formats: Sequence[str], mappings: Sequence[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tl-jax weights convert",
                                description="Convert a weights file into a checkpoint for config.init_from.")
    p.add_argument("--from", dest="source", required=True, metavar="FILE", help=".safetensors, .pt/.pth/.bin, .npz, or a model folder")
    p.add_argument("--format", choices=formats, default=None, help="default: from the file suffix")
    p.add_argument("--mapping", default=None, choices=sorted(mappings),
                   help="the source's naming scheme (default: recognised from the source, e.g. a Hugging Face folder)")
    p.add_argument("--model", default=None, help="tl_jax model name (config.model.name; default: the source's)")
    p.add_argument("--timm-name", default=None, metavar="ARCH",
                   help="a timm weights file without timm's config.json beside it: its architecture, e.g. "
                        "convnext_tiny.fb_in1k, resnet50.a1_in1k, vit_base_patch16_224.augreg_in21k")
    p.add_argument("--model-kwargs", default="{}", help="JSON dict of model kwargs (else read from the weights)")
    p.add_argument("--num-classes", type=int, default=None, help="default: the source classifier's, if any")
    p.add_argument("--ignore", action="append", default=[], metavar="REGEX",
                   help="drop source tensors whose name matches (repeatable), e.g. 'pooler\\..*'")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint dir to write (config.init_from)")
    p.add_argument("--overwrite", action="store_true")
    return p


def model_kwargs(text: str) -> dict:
    """``--model-kwargs``: a JSON dict (one-line error otherwise)."""
    return json_arg(text, dict, "--model-kwargs must be a JSON dict")


def cmd_weights(argv: Sequence[str]) -> int:
    top = weights_parser().parse_args(argv)
    if top.action == "inspect":
        args = inspect_parser().parse_args(top.args)
        # Deferred (JAX, torch readers): `tl-jax weights --help` runs without them.
        from tl_jax.weights import read_tensors

        for name, value in read_tensors(args.file).items():
            print(f"{name} {tuple(value.shape)} {value.dtype}")
        return 0
    if top.action == "merge":
        args = merge_parser().parse_args(top.args)
        # Deferred (JAX): `tl-jax weights --help` runs without it.
        from tl_jax.peft.merge_run import merge_run

        checkpoint = int(args.checkpoint) if args.checkpoint.isdigit() else args.checkpoint
        result = merge_run(args.workdir, args.out, checkpoint, overwrite=args.overwrite)
        print(f"wrote {result['out']}: {result['merged_layers']} LoRA layers ({result['lora_params']} params) "
              f"folded into {result['params']} base params")
        return 0
    # Deferred (JAX): the mapping and format names are the convert parser's choices.
    from tl_jax.weights import FORMATS, MAPPINGS, convert_timm, convert_weights

    args = convert_parser(FORMATS, MAPPINGS).parse_args(top.args)
    if args.timm_name:
        if args.mapping or args.model:
            raise ValueError("--timm-name picks the mapping and the model; leave --mapping and --model out")
        result = convert_timm(args.source, timm_name=args.timm_name, out=args.out, num_classes=args.num_classes,
                              model_kwargs=model_kwargs(args.model_kwargs), ignore=args.ignore,
                              overwrite=args.overwrite)
        print(result.summary())
        return 0
    result = convert_weights(args.source, mapping=args.mapping, model=args.model, out=args.out, fmt=args.format,
                             model_kwargs=model_kwargs(args.model_kwargs), num_classes=args.num_classes,
                             ignore=args.ignore, overwrite=args.overwrite)
    print(result.summary())
    return 0
