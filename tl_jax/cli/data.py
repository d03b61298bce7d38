"""``tl-jax data prepare``: an image folder or a CSV of texts as a tfds dataset (bring your own data).

    tl-jax data prepare --image-folder photos/ --name my_photos --data-dir data --image-size 64 64 --resize crop
    tl-jax data prepare --csv reviews.csv --name my_reviews --data-dir data --tokenizer tokenizer.json --max-length 64

Prints the dataset's summary and the ``--config.data...`` overrides that train on it.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from tl_jax.cli.args import action_parser

ACTIONS = {"prepare": "an image folder or a CSV of texts as a tfds array_record dataset"}


def data_parser() -> argparse.ArgumentParser:
    """``tl-jax data ACTION ...`` (ACTION: ``prepare``); ``--help`` lists the actions."""
    return action_parser("tl-jax data", "Bring your own data.", ACTIONS)


def prepare_parser() -> argparse.ArgumentParser:
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
    top = data_parser().parse_args(argv)
    args = prepare_parser().parse_args(top.args)
    common = dict(test_fraction=args.test_fraction, seed=args.seed, overwrite=args.overwrite)
    if args.image_folder:
        # Deferred (tensorflow_datasets, PIL): `tl-jax data --help` runs without them.
        from tl_jax.data.image_folder import prepare_image_folder

        result = prepare_image_folder(args.image_folder, args.name, args.data_dir, image_size=args.image_size,
                                      resize=args.resize, channels=args.channels, **common)
    else:
        if not args.tokenizer or not args.max_length:
            raise ValueError("--csv needs --tokenizer tokenizer.json and --max-length L")
        from tl_jax.data.text_csv import prepare_csv  # deferred (tensorflow_datasets, tokenizers)

        result = prepare_csv(args.csv, args.name, args.data_dir, tokenizer=args.tokenizer,
                             max_length=args.max_length, test_csv=args.test_csv, text_column=args.text_column,
                             label_column=args.label_column, **common)
    print(result.summary())
    hint = f" --config.data.data_dir={args.data_dir}" if args.data_dir else ""
    pp = " --config.data.train_pp='[]' --config.data.eval_pp='[]'" if args.csv else ""
    print(f"use: --config.data.name={args.name}{hint} --config.model.num_classes={len(result.class_names)}{pp}")
    return 0
