"""CSV text classification -> a tfds array_record dataset: ``prepare_csv``.

Input: a CSV file with a header holding a text column and a label column
(``text,label`` by default; labels may be any strings), and a Hugging Face
``tokenizer.json`` (read with the ``tokenizers`` library, no PyTorch).

Every text is tokenised (with the tokenizer's own special tokens, e.g.
``[CLS] ... [SEP]``), truncated to ``max_length`` tokens and padded to exactly
``max_length`` with the tokenizer's pad token. Stored example::

    {"input_ids": int32 [L], "attention_mask": int32 [L] (1 = token, 0 = padding),
     "label": int (index into the sorted label names)}

Rows with an empty text or label are reported by ``file:line`` and skipped.
Splits: a seeded stratified split of the file, or a given ``test_csv``.
"""
from __future__ import annotations

import csv
import hashlib
import pathlib
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from tl_jax.data import user_datasets as ud

_PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<PAD>")


def read_csv(path: pathlib.Path, text_column: str, label_column: str,
             skipped: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """``(texts, labels)`` of a CSV file; bad rows are appended to ``skipped``."""
    if not path.is_file():
        raise FileNotFoundError(f"CSV file {path} does not exist")
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in (text_column, label_column) if c not in columns]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing} in the header (columns: {columns}); "
                             "use --text-column / --label-column")
        for row in reader:
            text, label = row.get(text_column), row.get(label_column)
            where = f"{path}:{reader.line_num}"
            if text is None or not text.strip():
                skipped.append((where, "empty text"))
            elif label is None or not label.strip():
                skipped.append((where, "empty label"))
            else:
                texts.append(text)
                labels.append(label.strip())
    if not texts:
        raise ValueError(f"{path} has no usable rows (columns {text_column!r}, {label_column!r})")
    return texts, labels


def load_tokenizer(path: str | pathlib.Path, max_length: int):
    """A ``tokenizers.Tokenizer`` that truncates and pads to exactly ``max_length``.

    Returns ``(tokenizer, pad_id)``; the pad token is the tokenizer's padding
    config, else one of ``[PAD]``, ``<pad>``, ..., else id 0.
    """
    from tokenizers import Tokenizer

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist (a Hugging Face tokenizer.json)")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
        raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({e})") from None
    padding = tok.padding
    if padding:
        pad_id, pad_token = padding["pad_id"], padding["pad_token"]
    else:
        pad_token = next((t for t in _PAD_TOKENS if tok.token_to_id(t) is not None), None)
        pad_id = tok.token_to_id(pad_token) if pad_token else 0
        pad_token = pad_token or tok.id_to_token(0) or "[PAD]"
    tok.no_padding()
    tok.no_truncation()
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
    return tok, int(pad_id)


def tokenize(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """``(input_ids int32 [N, L], attention_mask int32 [N, L], n_truncated)``."""
    encodings = tok.encode_batch(texts)
    ids = np.asarray([e.ids for e in encodings], dtype=np.int32)
    mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int32)
    return ids, mask, sum(1 for e in encodings if e.overflowing)


def prepare_csv(
    csv_path: str | pathlib.Path,
    name: str,
    data_dir: str | None = None,
    *,
    tokenizer: str | pathlib.Path,
    max_length: int,
    test_csv: str | pathlib.Path | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    text_column: str = "text",
    label_column: str = "label",
    overwrite: bool = False,
) -> ud.PreparedDataset:
    """Tokenises ``csv_path`` into dataset ``name`` in ``data_dir`` (see module doc).

    Args:
      csv_path: the CSV (train, or everything when ``test_csv`` is None).
      name: dataset name for ``config.data.name`` (lower snake_case).
      data_dir: tfds data dir (``config.data.data_dir``); None = tfds' default.
      tokenizer: path of a Hugging Face ``tokenizer.json``.
      max_length: ``L``, tokens per example after truncation/padding.
      test_csv: a separate test CSV (same columns); else a seeded stratified
        split with ``test_fraction`` of each label in test.
      text_column, label_column: header names.
      overwrite: replace an existing dataset of that name.
    """
    ud.check_name(name)
    tok, pad_id = load_tokenizer(tokenizer, max_length)
    skipped: list[tuple[str, str]] = []
    csv_path = pathlib.Path(csv_path)
    texts, labels = read_csv(csv_path, text_column, label_column, skipped)
    if test_csv is not None:
        test_texts, test_labels = read_csv(pathlib.Path(test_csv), text_column, label_column, skipped)
        unknown = sorted(set(test_labels) - set(labels))
        if unknown:
            raise ValueError(f"{test_csv} has label(s) {unknown[:10]} that {csv_path} lacks")
        split_idx = {"train": np.arange(len(texts)), "test": np.arange(len(texts), len(texts) + len(test_texts))}
        texts, labels = texts + test_texts, labels + test_labels
    class_names = sorted(set(labels))
    index = {lab: i for i, lab in enumerate(class_names)}
    label_ids = np.array([index[lab] for lab in labels], dtype=np.int64)
    if test_csv is None:
        train_idx, test_idx = ud.stratified_split(label_ids, test_fraction, seed)
        split_idx = {"train": train_idx, "test": test_idx}
    ids, mask, n_truncated = tokenize(tok, texts)

    def generate(split: str):
        def gen() -> Iterator[dict]:
            for i in split_idx[split]:
                yield {"input_ids": ids[i], "attention_mask": mask[i], "label": int(label_ids[i])}
        return gen

    metadata = {"kind": "csv", "source": str(csv_path.absolute()),
                "test_source": str(pathlib.Path(test_csv).absolute()) if test_csv else None,
                "class_names": class_names, "tokenizer": str(pathlib.Path(tokenizer).absolute()),
                "tokenizer_sha256": hashlib.sha256(pathlib.Path(tokenizer).read_bytes()).hexdigest(),
                "vocab_size": tok.get_vocab_size(), "max_length": max_length, "pad_id": pad_id,
                "truncated": n_truncated, "test_fraction": None if test_csv else test_fraction,
                "seed": None if test_csv else seed, "skipped": [list(s) for s in skipped]}
    features = {"input_ids": tfds.features.Tensor(shape=(max_length,), dtype=np.int32),
                "attention_mask": tfds.features.Tensor(shape=(max_length,), dtype=np.int32),
                "label": tfds.features.ClassLabel(names=class_names)}
    path = ud.write_dataset(name, data_dir, features, {s: generate(s) for s in ("train", "test")}, metadata,
                            description=f"Text classification from {csv_path} ({len(class_names)} labels), "
                                        f"tokenised to {max_length} tokens by tl-jax.",
                            supervised_keys=None, overwrite=overwrite)
    return ud.PreparedDataset(name, path, tuple(class_names), {s: len(v) for s, v in split_idx.items()},
                              tuple(skipped), metadata)
