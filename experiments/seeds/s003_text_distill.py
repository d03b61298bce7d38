"""Seed 003: fine-tune a text transformer, then distil it into a smaller student made of a subset of its layers.

One command (phase 0 fine-tunes the teacher, phase 1 trains the 3-layer student with and without the
teacher's soft targets)::

    tl-jax sweep --config experiments/seeds/s003_text_distill.py --workdir runs/seeds/s003

What it reproduces from the document: fine-tuning a pretrained transformer on a text classification task
(the teacher), then knowledge distillation ``α·CE + (1−α)·T²·KL(softmax(t/T) ‖ softmax(s/T))``
(``config.objective.name='distill'``) into a smaller student that starts from teacher layers 0, 2, 4 as
its layers 0, 1, 2 (``config.init_map = layer_subset([0, 2, 4])``, tl_jax/params/merge.py), trained with
an L2 penalty (``config.loss.l2``) and dropout (``hidden_dropout``/``attention_dropout``, head
``dropout_rate``) as regularisation; ``stage=student`` is the same student without the teacher.

``data=embedded`` (default): a token stand-in built in memory from the embedded optdigits digits: each
8x8 digit as a 17-token "sentence" (``[CLS]``, its 8 rows, its 8 columns, each row/column a "word" = its
8-bit pattern of inked pixels; :func:`digit_tokens`), 1,347 train / 450 test, a 6-layer bert with D=32
(4 heads) as teacher, trained from scratch.
``data=catalogue``: your CSV prepared with all-MiniLM-L6-v2's tokenizer (``tl-jax data prepare --csv
FILE --name NAME --tokenizer ...``; ``dataset=NAME``, ``--config.data.data_dir``) and the real MiniLM
weights as the teacher's start (``tl-jax weights convert`` into ``weights=DIR``, docs/models.md): teacher
= MiniLM (6 layers, D=384), student = its layers 0, 2, 4. (``--mock-data`` does not apply: the CSV
dataset is yours, not tfds'.)

Printed on the embedded stand-in (2026-12-06, 2 CPU cores shared with other jobs, so 6-7 min a run; 300
steps of 32 each, seed 0; optdigits-token test set, 450 "sentences")::

    teacher (6 layers, from scratch): test/accuracy=0.8733
    | stage | test/accuracy |
    | student (layers 0, 2, 4 of the teacher, CE + L2 + dropout) | 0.882 |
    | kd (the same + distillation, α=0.5, T=4) | 0.880 |

The students start from the teacher's layers and train 300 more steps, so both pass this weak teacher;
distillation adds nothing here.
"""
from __future__ import annotations

import pathlib

import numpy as np

from tl_jax import config as config_lib
from tl_jax.params.merge import layer_subset

HERE = pathlib.Path(__file__).resolve()
KEEP = [0, 2, 4]  # teacher layers -> student layers 0, 1, 2
TINY = {"vocab_size": 514, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64, "max_position": 17}
CLS = 1  # token ids: 0 = [PAD] (unused), 1 = [CLS], 2 + r = row pattern r, 258 + c = column pattern c


def digit_tokens() -> dict:
    """``{"train", "test"}`` token splits from sklearn's optdigits (the embedded digits): each 8x8 digit as a
    17-token "sentence": [CLS], its 8 rows, then its 8 columns, each a "word" = the 8-bit pattern of its
    pixels > 4 (of 0..16); ``input_ids`` int32 ``[N, 17]``, all-ones ``attention_mask``, ``label``.
    1,347 train / 450 test (stratified, seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    bits = (d.images > 4).astype(np.int64)  # [N, 8, 8]
    weights = 2 ** np.arange(8)
    rows, cols = bits @ weights, bits.transpose(0, 2, 1) @ weights  # [N, 8] each, 0..255
    ids = np.concatenate([np.full((len(d.target), 1), CLS), 2 + rows, 258 + cols], axis=1).astype(np.int32)
    train, test = train_test_split(np.arange(len(ids)), test_size=450, stratify=d.target, random_state=0)
    return {name: {"input_ids": ids[idx], "attention_mask": np.ones_like(ids[idx]),
                   "label": d.target[idx].astype(np.int64)} for name, idx in (("train", train), ("test", test))}


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(arg, stage="kd", data="embedded", seed=0, teacher="runs/seeds/s003/teacher",
                             dataset="reviews", num_classes=0, weights="pretrained/minilm", alpha=0.5, temp=4.0,
                             l2=1e-4, dropout=0.1, steps=0)
    if a.data not in ("embedded", "catalogue"):
        raise config_lib.ConfigError(f"data={a.data!r}: expected 'embedded' or 'catalogue'")
    embedded = a.data == "embedded"
    c = config_lib.base_config()
    c.seed = a.seed
    c.model.name = "bert"
    arch = dict(TINY) if embedded else {}  # {}: all-MiniLM-L6-v2's shape (tl_jax/models/bert.py defaults)
    c.model.num_classes = 10 if embedded else a.num_classes
    c.model.dropout_rate = a.dropout
    c.data.name = f"{HERE}:digit_tokens" if embedded else a.dataset
    c.data.train_pp, c.data.eval_pp = [], []
    c.data.batch_size = 32
    c.data.eval_batch_size = 250
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3 if embedded else 5e-5
    c.optimizer.weight_decay = 0.0
    c.train.progress = False
    c.train.log_every = 50
    if a.stage == "teacher":  # fine-tune: from MiniLM's weights (catalogue) or from scratch (the tiny stand-in)
        c.model.kwargs = {**arch, "num_layers": 6, "hidden_dropout": a.dropout, "attention_dropout": a.dropout}
        c.init_from = "" if embedded else a.weights
        c.train.steps = a.steps or (300 if embedded else 1000)
    elif a.stage in ("student", "kd"):
        c.model.kwargs = {**arch, "num_layers": len(KEEP), "hidden_dropout": a.dropout,
                          "attention_dropout": a.dropout}
        c.init_from = a.teacher
        c.init_map = layer_subset(KEEP)  # teacher layers 0, 2, 4 -> student layers 0, 1, 2
        c.dont_load = ["head/.*"]
        c.loss.l2 = a.l2
        c.train.steps = a.steps or (300 if embedded else 1000)
        if a.stage == "kd":
            c.objective.name = "distill"
            kd = c.objective.distill
            kd.teacher, kd.alpha, kd.temperature = a.teacher, a.alpha, a.temp
    else:
        raise config_lib.ConfigError(f"stage={a.stage!r}: expected 'teacher', 'student' or 'kd'")
    c.train.checkpoint_every = c.train.steps
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    """Phase 0: the teacher; phase 1: the student alone and with distillation."""
    a = config_lib.parse_arg(arg, data="embedded", seeds=1)
    teacher = {"stage": "teacher", "data": a.data, "_name": "teacher", "_report": False}
    students = [{"stage": stage, "data": a.data, "seed": s, "teacher": "{workdir}/teacher", "_phase": 1,
                 "_name": f"{stage}_seed{s}"} for stage in ("student", "kd") for s in range(a.seeds)]
    return [teacher] + students
