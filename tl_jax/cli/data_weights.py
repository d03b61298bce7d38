"""``tl-jax data prepare`` and ``tl-jax weights convert|inspect``: bring your own data and weights.

    tl-jax data prepare --image-folder photos/ --name my_photos --data-dir data --image-size 64 64 --resize crop
    tl-jax data prepare --csv reviews.csv --name my_reviews --data-dir data --tokenizer tokenizer.json --max-length 64
    tl-jax weights inspect model.safetensors
    tl-jax weights convert --from model.safetensors --mapping bert --model bert --out pretrained/minilm \\
        --ignore 'pooler\\..*'
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence


def _data_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tl-jax data prepare",
                                description="Prepare an image folder or a CSV of texts as a tfds array_record "
                                            "dataset, usable as config.data.name=NAME, config.data.data_dir=DIR.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image-folder", metavar="DIR", help="DIR/<class>/<images>, or DIR/{train,test}/<class>/...")
    src.add_argument("--csv", metavar="FILE", help="CSV with a header; text and label columns")
    p.add_argument("--name", required=True, help="dataset name (lower snake_case): config.data.name")
    p.add_argument("--data-dir", default=None, help="tfds data dir (config.data.data_dir); default: tfds' default")
    p.add_argument("--test-fraction", type=float, default=0.2, help="seeded stratified test share (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that name")
    img = p.add_argument_group("images")
    img.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="resize every image to H x W")
    img.add_argument("--resize", default="stretch", choices=["stretch", "crop", "pad"],
                     help="how to reach --image-size: stretch, crop (centre, keep aspect), pad (keep aspect)")
    img.add_argument("--channels", type=int, default=3, choices=[1, 3], help="3 = RGB, 1 = grayscale")
    txt = p.add_argument_group("text")
    txt.add_argument("--tokenizer", help="a Hugging Face tokenizer.json")
    txt.add_argument("--max-length", type=int, help="tokens per example (truncate / pad)")
    txt.add_argument("--test-csv", help="a separate test CSV (else a split of --csv)")
    txt.add_argument("--text-column", default="text")
    txt.add_argument("--label-column", default="label")
    return p


def cmd_data(argv: Sequence[str]) -> int:
    if not argv or argv[0] != "prepare":
        raise ValueError("usage: tl-jax data prepare (--image-folder DIR | --csv FILE) --name NAME ... "
                         "(tl-jax data prepare --help)")
    args = _data_parser().parse_args(list(argv[1:]))
    common = dict(test_fraction=args.test_fraction, seed=args.seed, overwrite=args.overwrite)
    if args.image_folder:
        from tl_jax.data.image_folder import prepare_image_folder

        result = prepare_image_folder(args.image_folder, args.name, args.data_dir, image_size=args.image_size,
                                      resize=args.resize, channels=args.channels, **common)
    else:
        if not args.tokenizer or not args.max_length:
            raise ValueError("--csv needs --tokenizer tokenizer.json and --max-length L")
        from tl_jax.data.text_csv import prepare_csv

        result = prepare_csv(args.csv, args.name, args.data_dir, tokenizer=args.tokenizer,
                             max_length=args.max_length, test_csv=args.test_csv, text_column=args.text_column,
                             label_column=args.label_column, **common)
    print(result.summary())
    hint = f" --config.data.data_dir={args.data_dir}" if args.data_dir else ""
    pp = " --config.data.train_pp='[]' --config.data.eval_pp='[]'" if args.csv else ""
    print(f"use: --config.data.name={args.name}{hint} --config.model.num_classes={len(result.class_names)}{pp}")
    return 0


def _weights_parser() -> argparse.ArgumentParser:
    from tl_jax.weights import FORMATS, MAPPINGS

    p = argparse.ArgumentParser(prog="tl-jax weights convert",
                                description="Convert a weights file into a checkpoint for config.init_from.")
    p.add_argument("--from", dest="source", required=True, metavar="FILE", help=".safetensors, .pt/.pth/.bin, .npz")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: from the file suffix")
    p.add_argument("--mapping", required=True, choices=sorted(MAPPINGS), help="the source's naming scheme")
    p.add_argument("--model", required=True, help="tl_jax model name (config.model.name)")
    p.add_argument("--model-kwargs", default="{}", help="JSON dict of model kwargs (else read from the weights)")
    p.add_argument("--num-classes", type=int, default=None, help="default: the source classifier's, if any")
    p.add_argument("--ignore", action="append", default=[], metavar="REGEX",
                   help="drop source tensors whose name matches (repeatable), e.g. 'pooler\\..*'")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint dir to write (config.init_from)")
    p.add_argument("--overwrite", action="store_true")
    return p


def cmd_weights(argv: Sequence[str]) -> int:
    if argv and argv[0] == "inspect":
        if len(argv) != 2:
            raise ValueError("usage: tl-jax weights inspect FILE")
        from tl_jax.weights import read_tensors

        for name, value in read_tensors(argv[1]).items():
            print(f"{name} {tuple(value.shape)} {value.dtype}")
        return 0
    if not argv or argv[0] != "convert":
        raise ValueError("usage: tl-jax weights convert --from FILE --mapping M --model NAME --out DIR "
                         "(or: tl-jax weights inspect FILE)")
    args = _weights_parser().parse_args(list(argv[1:]))
    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-kwargs must be a JSON dict: {e}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model-kwargs must be a JSON dict, got {args.model_kwargs!r}")
    from tl_jax.weights import convert_weights

    result = convert_weights(args.source, mapping=args.mapping, model=args.model, out=args.out, fmt=args.format,
                             model_kwargs=kwargs, num_classes=args.num_classes, ignore=args.ignore,
                             overwrite=args.overwrite)
    print(result.summary())
    return 0
