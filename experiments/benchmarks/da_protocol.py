"""TLlib's unsupervised domain-adaptation protocol, shared by the four DA suite configs of this folder.

``office31.py``, ``office_home.py``, ``visda2017.py`` and ``domainnet.py`` each describe a suite (its domains,
classes, tasks, steps and TLlib's published accuracies: a :class:`Suite`) and call :func:`build`, which turns
``task=A2W,method=dann,weights=DIR,data_dir=DIR`` into a tl_jax config. Nothing here is a config file itself.

The recipe is TLlib's (``examples/domain_adaptation/image_classification/{dann,cdan,mcc,mdd}.py`` defaults and
their ``*.sh`` commands, read at commit c4aa59e):

* backbone: an ImageNet ResNet-50 (torchvision's, converted by ``tl-jax weights convert --mapping
  torchvision_resnet --model resnet50``: ``weights=DIR``), its ``head`` a fresh Dense layer;
* input: each domain prepared at 256x256 (TLlib's ``ResizeImage(256)``); train: RandomResizedCrop(224, scale
  [0.08, 1], ratio [3/4, 4/3]) + flip (``inception_crop`` + ``flip_lr``; VisDA: centre crop + flip, TLlib's
  ``--train-resizing cen.crop``), ImageNet mean/std; test: centre crop 224;
* optimizer: SGD, momentum 0.9, lr 0.01 (MCC 0.005, MDD 0.004) with the backbone at 0.1x (``param_rules``,
  TLlib's ``get_parameters``), PyTorch weight decay 1e-3 (MDD 5e-4) as ``config.loss.l2 = wd / 2`` (the same
  gradient ``wd * theta``);
* batch 32 source + 32 target (MCC 36), trade-off weight 1, steps = epochs x iterations per epoch of the
  suite's ``dann.sh`` line (:attr:`Suite.steps`); what a method's own ``*.sh`` line changes for a suite is in
  the suite's ``SUITE.overrides``;
* DANN's discriminator 2 x 1024 (TLlib's ``DomainDiscriminator(hidden_size=1024)``), MDD's adversarial head
  1024 wide, margin 4; MCC temperature 2.5; CDAN without entropy conditioning (TLlib's ``cdan.sh`` has no ``-E``);
  FixMatch (``self_training``): threshold 0.9, the weak view the train crop + flip, the strong view the same
  + RandAugment with 2 ops at magnitude 10 (TLlib's timm ``rand-m10-n2-mstd2``; tl_jax's is torchvision's
  RandAugment, without timm's magnitude noise);
* the gradient-reversal weight of DANN, CDAN and MDD: TLlib's ``WarmStartGradientReverseLayer(alpha=1,
  max_iters=1000)``, ``2 / (1 + exp(-i / 1000)) - 1`` at iteration ``i`` (times ``hi = 0.1`` for MDD), which is
  tl_jax's ``2 / (1 + exp(-gamma * i / steps)) - 1`` with ``gamma = steps / 1000`` (set from the run's steps:
  change them with the ``steps=`` argument, not ``--config.train.steps``, so that gamma follows).

Where tl_jax differs (so the tl_jax column is not a bit-for-bit rerun of TLlib): TLlib anneals the lr as
``lr * (1 + 0.001 i)^-0.75`` (to ~0.1x at the end) with nesterov momentum; tl_jax has constant/cosine/
warmup_cosine and plain momentum, and these configs use ``cosine``. TLlib puts a bottleneck (Linear-BN-ReLU,
256 to 2,048 wide) between the pooled features and the classifier, the adaptation losses reading its output;
here the heads and the losses read the 2,048-d pooled features directly. DANN's discriminator uses LayerNorm
where TLlib's uses BatchNorm. ``source_only`` is the same two-domain pipeline with adaptation weight 0 (exactly
cross-entropy on the source, but BatchNorm in train mode also sees the target batch), where TLlib's ERM trains
on the source alone. VisDA and DomainNet are published on ResNet-101, which tl_jax has neither a model nor a
converter for: their published column is a reference, not a like-for-like target.

Hyperparameters are the protocol's published ones. Any tuning is on a validation split, never on test
(``tune=1``): Office-31, Office-Home and VisDA runs adapt to and score on all of a target's images
(``train+test``, unlabelled in training, as TLlib), and ``tune=1`` adapts to the target's prepared ``train``
split and scores its held-out ``test`` split (the stratified 20 % ``tl-jax data prepare`` carved out);
DomainNet runs score the official test list, and ``tune=1`` reads ``<dataset>_tune`` instead, the target's
train list prepared on its own (``tl-jax data prepare`` splits it 80/20, stratified), so no tuning run reads
a test image.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

from tl_jax import config as config_lib

IMAGENET_NORM = {"op": "normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
TLLIB = ("TLlib (thuml/Transfer-Learning-Library) examples/domain_adaptation/image_classification/README.md, "
         "commit c4aa59e (2024-03-23)")
PREPARED_PX = 256  # TLlib's ResizeImage(256): every domain is prepared at 256 x 256 (stretch)
CROP_PX = 224

# method -> (objective, its extra settings, lr, batch, PyTorch weight decay, TLlib's README row name)
METHODS = {
    "source_only": ("coral", {"weight": 0.0}, 0.01, 32, 1e-3, "ERM"),
    "dann": ("dann", {"hidden": 1024, "depth": 2}, 0.01, 32, 1e-3, "DANN"),
    "cdan": ("cdan", {"entropy": False, "hidden": 1024, "depth": 2}, 0.01, 32, 1e-3, "CDAN"),
    "mcc": ("mcc", {"temperature": 2.5}, 0.005, 36, 1e-3, "MCC"),
    "mdd": ("mdd", {"margin": 4.0, "hidden": 1024, "grl_max": 0.1}, 0.004, 32, 5e-4, "MDD"),
    "mmd": ("mmd", {"kernel_mul": 2.0, "num_kernels": 5}, 0.01, 32, 1e-3, "DAN"),
    "coral": ("coral", {}, 0.01, 32, 1e-3, ""),
    "self_training": ("self_training", {"threshold": 0.9}, 0.01, 32, 1e-3, "FixMatch"),
}


@dataclasses.dataclass(frozen=True)
class Suite:
    """One benchmark suite: ``domains`` maps a task letter to the domain's folder name (the dataset is
    ``<name>_<folder lower-cased>``), ``tasks`` are ``'<src>2<tgt>'``, ``published`` maps a tl_jax method to
    ``{task: TLlib's accuracy in %}`` (with ``'avg'``), ``steps`` TLlib's epochs x iterations of ``dann.sh``;
    ``overrides`` what a method's own ``*.sh`` line sets differently for this suite: ``steps``, ``lr``,
    ``batch``, ``target_batch`` or a key of the method's objective group (``temperature``, ``weight``...)."""

    name: str
    title: str
    domains: dict
    num_classes: int
    tasks: tuple
    steps: int
    published: dict
    published_backbone: str = "ResNet-50"
    overrides: dict = dataclasses.field(default_factory=dict)
    center_crop_train: bool = False  # VisDA: TLlib's --train-resizing cen.crop
    source_split: str = "train+test"  # the labelled source: all its images
    target_split: str = "train+test"  # the unlabelled target pool
    test_split: str = "train+test"  # what test/accuracy scores (TLlib: all target images)

    def dataset(self, letter: str) -> str:
        return f"{self.name}_{self.domains[letter].lower()}"

    def parse_task(self, task: str) -> tuple[str, str]:
        """``'A2W'`` -> ``('A', 'W')``; a one-line error naming ``task=`` and the suite's tasks otherwise."""
        if task not in self.tasks:
            raise config_lib.ConfigError(f"task={task!r}: {self.title} tasks are {list(self.tasks)}")
        src, tgt = task.split("2")
        return src, tgt


def converted_backbone(weights: str) -> tuple[str, dict] | None:
    """``(model, model_kwargs)`` recorded by ``tl-jax weights convert`` in ``weights/tl_jax_weights.json``, or
    None when ``weights`` is empty or holds no such file (then the protocol's own architecture is used)."""
    meta = pathlib.Path(weights or "").expanduser() / "tl_jax_weights.json"
    if not weights or not meta.is_file():
        return None
    record = json.loads(meta.read_text())
    return record["model"], dict(record.get("model_kwargs") or {})


def pipelines(px: int, prepared: int, center_crop_train: bool) -> tuple[list, list]:
    """``(train_pp, eval_pp)`` on images prepared at ``prepared`` x ``prepared``: a ``px`` crop (random
    resized, or centred for VisDA) + flip for training, a centred ``px`` crop for testing, ImageNet mean/std."""
    tail = [{"op": "rescale", "in_max": 255.0}, IMAGENET_NORM]
    center = [{"op": "center_crop", "size": px}]
    crop = center if center_crop_train else [{"op": "inception_crop", "size": px, "area": [0.08, 1.0],
                                              "aspect": [3 / 4, 4 / 3]}]
    resize = [{"op": "resize", "size": prepared}] if px > prepared else []  # smoke runs on tiny folders
    return resize + crop + [{"op": "flip_lr"}] + tail, resize + center + tail


def build(suite: Suite, arg: str | None):
    """The config of one (task, method) run of ``suite`` from ``arg``: ``task`` (default the first),
    ``method`` (a key of :data:`METHODS`, default dann), ``seed``, ``weights`` (a converted checkpoint folder:
    ``init_from``, and its recorded architecture), ``data_dir`` (where the domains are prepared), ``steps``
    (0: the protocol's), ``weight`` (the adaptation weight; -1: the protocol's), ``tune`` (score a labelled
    carve-out of the target's training images instead of its test images) and ``smoke`` (a tiny CNN on 32 px
    crops, batches of 4: for tests on tiny folders)."""
    a = config_lib.parse_arg(arg, task=suite.tasks[0], method="dann", seed=0, weights="", data_dir="data",
                             steps=0, weight=-1.0, tune=False, smoke=False)
    if a.method not in METHODS:
        raise config_lib.ConfigError(f"method={a.method!r}: known methods {sorted(METHODS)}")
    src, tgt = suite.parse_task(a.task)
    objective, extra, lr, batch, wd, _ = METHODS[a.method]
    own = dict(suite.overrides.get(a.method, {}))
    lr, batch, target_batch = own.pop("lr", lr), own.pop("batch", batch), own.pop("target_batch", 0)
    steps = own.pop("steps", suite.steps)
    px, prepared = (32, 32) if a.smoke else (CROP_PX, PREPARED_PX)
    train_pp, eval_pp = pipelines(px, prepared, suite.center_crop_train)
    c = config_lib.base_config()
    c.seed = a.seed
    c.model.name, c.model.kwargs = "resnet50", {"base_width": 64, "stem": "imagenet"}
    if (backbone := converted_backbone(a.weights)) is not None:
        c.model.name, c.model.kwargs = backbone
    if a.smoke:  # a tiny stand-in backbone so that a test trains a few steps in seconds
        c.model.name, c.model.kwargs = "cnn", {}
    c.model.num_classes = suite.num_classes
    c.init_from = a.weights
    c.data.name, c.data.data_dir = suite.dataset(src), a.data_dir
    c.data.train_split, c.data.test_split = suite.source_split, suite.test_split
    c.data.train_pp, c.data.eval_pp = train_pp, eval_pp
    c.data.batch_size = 4 if a.smoke else batch
    c.data.eval_batch_size = 8 if a.smoke else 100
    c.optimizer.name, c.optimizer.learning_rate, c.optimizer.momentum = "sgd", lr, 0.9
    c.optimizer.schedule = "cosine"
    c.loss.l2 = wd / 2  # PyTorch SGD's weight_decay wd adds wd*theta to the gradient; l2*|theta|^2 adds 2*l2*theta
    c.param_rules = [["backbone/.*", 0.1], [".*", 1.0]]  # TLlib: backbone at 0.1x the head's lr
    c.train.steps = a.steps or steps
    c.train.log_every = min(100, c.train.steps)
    c.train.checkpoint_every = min(5000, c.train.steps)
    c.train.progress = False
    c.objective.name = objective
    group = c.objective[objective]
    group.target, group.target_pp, group.target_eval_pp = suite.dataset(tgt), list(train_pp), list(eval_pp)
    group.target_split, group.target_test_split = suite.target_split, suite.test_split
    if a.tune:  # model selection: a labelled carve-out of the target's training images, never its test images
        if suite.test_split != "train+test":  # the test split is the protocol's test: tune on <dataset>_tune
            group.target = f"{group.target}_tune"
        group.target_split, group.target_test_split = "train", "test"
    group.weight = 1.0
    group.target_batch_size = 0 if a.smoke else target_batch
    for k, v in {**extra, **own}.items():
        group[k] = v
    if "grl_max" in group or objective in ("dann", "cdan"):  # TLlib's warm start: gamma * i / steps = i / 1000
        group.gamma = c.train.steps / 1000
    if a.weight >= 0 and a.method != "source_only":
        group.weight = a.weight
    if objective == "self_training":  # FixMatch: two independent views of each target image, as TLlib's
        k = [op["op"] for op in train_pp].index("flip_lr") + 1  # weak = the train crop + flip, strong = + RandAugment
        group.target_pp, group.weak_pp = [], list(train_pp)
        group.strong_pp = train_pp[:k] + [{"op": "randaugment", "num_ops": 2, "magnitude": 10}] + train_pp[k:]
    return c


def sweep(suite: Suite, arg: str | None) -> list[dict]:
    """Every task of ``suite`` x ``methods`` (';'-separated) x ``seeds``, with ``weights``/``data_dir``."""
    a = config_lib.parse_arg(arg, methods="source_only;dann;cdan;mcc;mdd", seeds=1, weights="", data_dir="data")
    return [{"task": t, "method": m, "seed": s, "weights": a.weights, "data_dir": a.data_dir,
             "_name": f"{t}_{m}_seed{s}"}
            for t in suite.tasks for m in a.methods.split(";") for s in range(a.seeds)]


def markdown_table(suite: Suite) -> str:
    """The docs table: task, method, TLlib's published accuracy, an empty tl_jax column (one row per task and
    method with a published number, then the average)."""
    rows = [f"| task | method (TLlib's row) | published (%, {suite.published_backbone}) | tl_jax |",
            "|---|---|---:|---:|"]
    for task in suite.tasks + ("avg",):
        for method, by_task in suite.published.items():
            if task in by_task:
                rows.append(f"| {task.replace('2', '→') if task != 'avg' else 'average'} | {method} "
                            f"({METHODS[method][5]}) | {by_task[task]:.1f} | |")
    return "\n".join(rows)
