"""Seed 001: ResNet-18 trained on a source domain, moved to a target domain; plus ``P_target = P_source + α·P_diff``.

One command (phase 0 trains the source ResNet-18, phase 1 the target methods)::

    tl-jax sweep --config experiments/seeds/s001_cifar_resnet.py --workdir runs/seeds/s001

What it reproduces from the document: ``torchvision.models.resnet18`` trained on CIFAR-10 with SGD
(momentum 0.9) on images resized to 224x224 and normalised with ImageNet's mean/std, then fine-tuned on
CIFAR-100 (``method=finetune``); and its formula ``P_target(y|x) = P_source(y|x) + α·P_diff(y|x)``, as
tl_jax's residual objectives: at the output (``method=residual_output``: the frozen source model's logits
plus α times a trained difference branch; needs the same classes in both domains) and at the parameters
(``method=residual_params``: θ = sg(θ_source) + α·Δ, Δ a LoRA on the conv kernels and a dense delta on
the head).

``data=catalogue``: cifar10 -> cifar100 at ``px=224`` (default), ResNet-18 with the ImageNet stem and 64
base channels, 10 shots per class of the 100 (``residual_output`` refused: 10 vs 100 classes).
``data=embedded`` (default): mnist5k -> optdigits, grey digits as RGB at ``px=32``, a ResNet-18 with the
CIFAR stem and 16 base channels (small enough for 2 CPU cores), 10 shots per class; same ImageNet
normalisation.

Printed on the embedded stand-ins (2026-12-06, 2 CPU cores shared with other jobs: 25 min wall for the
sweep, 4.5 min of CPU; source 200 steps of 64, target 100 steps of 32 at SGD lr 0.05, 10 shots, seed 0)::

    source (mnist5k test, 1,000 images): test/accuracy=0.9700
    | method | test/accuracy |          (optdigits test, 450 digits)
    | finetune | 0.951 |
    | residual_output (α=1, a new head on the frozen source features) | 0.893 |
    | residual_params (α=1, LoRA rank 4 on the convs, dense Δ on the head) | 0.940 |
"""
from __future__ import annotations

from tl_jax import config as config_lib
from tl_jax.sweep import product

IMAGENET_NORM = {"op": "normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
METHODS = ("finetune", "residual_output", "residual_params")


def _pp(in_max: float, px: int) -> list[dict]:
    """The document's transform: resize to px x px, RGB in [0, 1], ImageNet mean/std."""
    return [{"op": "rescale", "in_max": in_max}, {"op": "to_rgb"}, {"op": "resize", "size": px}, IMAGENET_NORM]


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(arg, stage="target", method="finetune", data="embedded", shots=10, seed=0,
                             source="runs/seeds/s001/source", px=0, alpha=1.0, steps=0)
    if a.data not in ("embedded", "catalogue"):
        raise config_lib.ConfigError(f"data={a.data!r}: expected 'embedded' or 'catalogue'")
    embedded = a.data == "embedded"
    px = a.px or (32 if embedded else 224)
    c = config_lib.base_config()
    c.seed = a.seed
    c.model.name = "resnet18"
    c.model.kwargs = {"base_width": 16, "stem": "cifar"} if embedded else {"base_width": 64, "stem": "imagenet"}
    c.optimizer.name = "sgd"
    c.optimizer.momentum = 0.9
    c.optimizer.learning_rate = 0.05 if embedded else 0.01
    c.data.eval_batch_size = 250
    c.train.progress = False
    c.train.log_every = 50
    if a.stage == "source":
        c.model.num_classes = 10
        c.data.name = "mnist5k" if embedded else "cifar10"
        c.data.train_pp = _pp(255.0, px)
        c.data.eval_pp = _pp(255.0, px)
        c.data.batch_size = 64
        c.train.steps = a.steps or (200 if embedded else 20000)
    elif a.stage == "target":
        if a.method not in METHODS:
            raise config_lib.ConfigError(f"method={a.method!r}: known methods {list(METHODS)}")
        if a.method == "residual_output" and not embedded:
            raise config_lib.ConfigError("method=residual_output adds the source's 10-class logits: cifar100 has "
                                         "100 classes; use method=residual_params or finetune")
        c.model.num_classes = 10 if embedded else 100
        c.data.name = "optdigits" if embedded else "cifar100"
        in_max = 16.0 if embedded else 255.0
        c.data.train_pp, c.data.eval_pp = _pp(in_max, px), _pp(in_max, px)
        c.data.shots = a.shots  # 0 = all examples
        c.data.shots_seed = a.seed
        c.data.batch_size = 32
        c.train.steps = a.steps or (100 if embedded else 2000)
        c.init_from = a.source
        same_classes = embedded  # the source head fits the target's classes: keep it
        c.dont_load = [] if same_classes else ["head/.*"]
        if a.method == "residual_output":  # z = sg(f_source(x)) + α·f_diff(x), f_diff a head on source features
            c.objective.name = "residual_output"
            c.objective.residual_output.source = a.source
            c.objective.residual_output.alpha = a.alpha
            c.param_rules = [["backbone/.*", None], [".*", 1.0]]
        elif a.method == "residual_params":  # θ = sg(θ_source) + α·Δ
            c.objective.name = "residual_params"
            rp = c.objective.residual_params
            rp.alpha, rp.lora_rank = a.alpha, 4
            rp.dense_rules = ["head/.*"]
            rp.lora_rules = ["backbone/.*conv.*/kernel"]
    else:
        raise config_lib.ConfigError(f"stage={a.stage!r}: expected 'source' or 'target'")
    c.train.checkpoint_every = c.train.steps
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    """Phase 0: the source ResNet-18; phase 1: each method (``residual_output`` on embedded data only)."""
    a = config_lib.parse_arg(arg, data="embedded", shots=10, seeds=1, px=0)
    methods = [m for m in METHODS if a.data == "embedded" or m != "residual_output"]
    fixed = {"data": a.data, **({"px": a.px} if a.px else {})}
    source = {"stage": "source", **fixed, "_name": "source", "_report": False}
    target = {"stage": "target", **fixed, "shots": a.shots, "source": "{workdir}/source", "_phase": 1}
    return [source] + product(target, method=methods, seed=list(range(a.seeds)))
