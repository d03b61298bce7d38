"""Builds timm / open_clip reference models (random init) and saves them as their libraries do.

Run as a script, in a subprocess of the tests (tests/test_weights_timm.py)::

    python tests/reference_timm.py OUT_DIR '[{"name": "convnext", "timm": "convnext_atto", "kwargs": {...}}, ...]'

For each spec it writes ``OUT_DIR/<name>/``: the checkpoint as the library writes
it (timm: ``timm.models.save_for_hf``, i.e. ``model.safetensors`` or
``pytorch_model.bin`` + ``config.json``, what ``huggingface-cli download timm/...``
fetches) and ``reference.npz`` with the input ``x`` (NCHW), the pre-logits
``features`` and the ``logits`` of the model on it. Norm affine params, BatchNorm
running statistics and LayerScale ``gamma`` are drawn away from their init
(ones/zeros/1e-6), so a swapped or skipped tensor changes the outputs.

Why a subprocess with a stand-in ``torchvision``: timm and open_clip import
torchvision at import time (for data transforms only), and the only torchvision
wheels that fit the CPU torch pinned here are CUDA builds that fail to load. When
``import torchvision`` fails, this script puts an inert stand-in on ``sys.meta_path``
for its own process only; the model code under test is timm's own. With a working
torchvision (a normal install) the stand-in is not used.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import pathlib
import sys
import types


class _AnyAttr(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return f"{cls.__name__}.{name}"


class _StandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _AnyAttr(name, (), {})


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``torchvision`` and its submodules as inert modules (see module doc)."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandIn(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _torchvision_or_stand_in() -> None:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a CUDA build beside CPU torch raises RuntimeError at import
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _StandInFinder())


def perturb(model, seed: int = 0) -> None:
    """Norm weights/biases, BN running stats and LayerScale gammas away from their init values."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d, torch.nn.GroupNorm)) or \
                    type(module).__name__ in ("LayerNorm2d", "LayerNormFp32", "LayerNorm"):
                if getattr(module, "weight", None) is not None:
                    module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("gamma", "gamma_1", "gamma_2", "scale_1", "scale_2") or name.endswith(("ls1.gamma",
                                                                                                 "ls2.gamma")):
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)


def build_timm(spec: dict, out: pathlib.Path) -> None:
    """timm ``create_model(spec['timm'], pretrained=False, **spec['kwargs'])``, saved with ``save_for_hf``."""
    import numpy as np
    import timm
    import torch
    from timm.models import save_for_hf

    torch.manual_seed(spec.get("seed", 0))
    model = timm.create_model(spec["timm"], pretrained=False, **spec.get("kwargs", {})).eval()
    perturb(model, spec.get("seed", 0))
    save_for_hf(model, str(out), safe_serialization=spec.get("safe", True), model_args=spec.get("kwargs", {}))
    size = spec.get("size", 32)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = model.forward_features(x)
        if spec.get("features") == "cls_dist":  # a distilled DeiT: both tokens (timm's pre_logits averages them)
            feats = torch.cat([tokens[:, 0], tokens[:, 1]], dim=-1)
        else:
            feats = model.forward_head(tokens, pre_logits=True)
        logits = model(x)
    extra = {}
    if spec.get("size2"):  # another input size: the model resizes its position table (dynamic_img_size=True)
        x2 = torch.randn(2, 3, spec["size2"], spec["size2"], generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            extra = {"x2": x2.numpy(), "logits2": model(x2).numpy()}
    np.savez(out / "reference.npz", x=x.numpy(), features=feats.numpy(), logits=logits.numpy(), **extra)


def build_open_clip(spec: dict, out: pathlib.Path) -> None:
    """``open_clip.model.CLIP(**spec['model_cfg'])`` saved as open_clip's ``push_to_hf_hub`` does (no tokenizer)."""
    import numpy as np
    import open_clip
    import safetensors.torch
    import torch
    from open_clip.push_to_hf_hub import save_config_for_hf

    torch.manual_seed(spec.get("seed", 0))
    model = open_clip.model.CLIP(**spec["model_cfg"]).eval()
    perturb(model, spec.get("seed", 0))
    # what open_clip.create_model sets on the tower (the config records it as preprocess_cfg)
    model.visual.image_mean, model.visual.image_std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    safetensors.torch.save_file(model.state_dict(), out / "open_clip_model.safetensors")
    save_config_for_hf(model, out / "open_clip_config.json", model_config=spec["model_cfg"])
    size = spec["model_cfg"]["vision_cfg"]["image_size"]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = model.encode_image(x)
    np.savez(out / "reference.npz", x=x.numpy(), features=feats.numpy())


BUILDERS = {"timm": build_timm, "open_clip": build_open_clip}


def main(out_dir: str, specs_json: str) -> None:
    _torchvision_or_stand_in()
    import torch

    torch.set_num_threads(1)
    for spec in json.loads(specs_json):
        out = pathlib.Path(out_dir) / spec["name"]
        out.mkdir(parents=True, exist_ok=True)
        BUILDERS[spec.get("library", "timm")](spec, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
