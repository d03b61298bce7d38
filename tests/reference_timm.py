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
            if name in ("reg_token", "attn_pool.latent"):  # registers start at ~0: a skipped one would not show
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
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
    extra = {}
    if spec.get("size2"):  # open_clip's own resize_pos_embed (what create_model does on a size change), then load
        cfg = {**spec["model_cfg"], "vision_cfg": {**spec["model_cfg"]["vision_cfg"], "image_size": spec["size2"]}}
        model2 = open_clip.model.CLIP(**cfg).eval()
        state = model.state_dict()
        open_clip.model.resize_pos_embed(state, model2)
        model2.load_state_dict(state)
        x2 = torch.randn(2, 3, spec["size2"], spec["size2"], generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            extra = {"x2": x2.numpy(), "features2": model2.encode_image(x2).numpy()}
    np.savez(out / "reference.npz", x=x.numpy(), features=feats.numpy(), **extra)


def big_vision_params(spec: dict, rng) -> dict:
    """Random params of a big_vision ViT (``big_vision/models/vit.py`` names and flax layouts), flat '/' keys."""
    import numpy as np

    d, depth, heads, mlp = spec["width"], spec["depth"], spec["heads"], spec["mlp"]
    p, grid = spec["patch"], spec["grid"]

    def r(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype("float32")

    def norm():
        return {"scale": (rng.random(d) + 0.5).astype("float32"), "bias": r(d, scale=0.1)}

    def attention():
        qkv = {n: {"kernel": r(d, heads, d // heads), "bias": r(heads, d // heads)} for n in ("query", "key", "value")}
        return {**qkv,
                "out": {"kernel": r(heads, d // heads, d), "bias": r(d)}}

    def mlp_block():
        return {"Dense_0": {"kernel": r(d, mlp), "bias": r(mlp)}, "Dense_1": {"kernel": r(mlp, d), "bias": r(d)}}

    tree = {"embedding": {"kernel": r(p, p, 3, d), "bias": r(d)}, "pos_embedding": r(1, grid * grid, d),
            "Transformer": {"encoder_norm": norm()}, "head": {"kernel": r(d, 5), "bias": r(5)}}
    blocks = [{"LayerNorm_0": norm(), "MultiHeadDotProductAttention_0": attention(), "LayerNorm_1": norm(),
               "MlpBlock_0": mlp_block()} for _ in range(depth)]
    if spec.get("vintage") == "vision_transformer":  # the original repo: its module names, cls inside the table
        blocks = [{{"LayerNorm_1": "LayerNorm_2", "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
                    "MlpBlock_0": "MlpBlock_3"}.get(k, k): v for k, v in b.items()} for b in blocks]
        tree["Transformer"]["posembed_input"] = {"pos_embedding": r(1, grid * grid + 1, d)}
        del tree["pos_embedding"]
    if spec["pool"] == "tok":
        tree["cls"] = r(1, 1, d)
    if spec["pool"] == "map":
        tree["MAPHead_0"] = {"probe": r(1, 1, d), "MultiHeadDotProductAttention_0": attention(),
                             "LayerNorm_0": norm(), "MlpBlock_0": mlp_block()}
    prefix = spec.get("prefix", "")
    flat = {prefix + k: v for k, v in _flat(tree).items()}
    block_prefix = prefix + "Transformer/encoderblock"
    if spec.get("scan"):  # nn.scan over the blocks: one stacked array per param
        for key in _flat(blocks[0]):
            flat[f"{block_prefix}/{key}"] = np.stack([_flat(b)[key] for b in blocks])
    else:
        for i, b in enumerate(blocks):
            flat.update({f"{block_prefix}_{i}/{k}": v for k, v in _flat(b).items()})
    return flat


def _flat(node: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in node.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def resample_posemb(old, gs_new: int, tokens: int):
    """big_vision's ``resample_posemb`` (``big_vision/models/vit.py``: ``tokens=0``, its table holds patches only)
    and vision_transformer's (``vit_jax/checkpoint.py``: ``tokens=1``, the class row kept), transcribed:
    ``[1, tokens + g*g, D]`` -> ``[1, tokens + gs_new**2, D]`` by ``scipy.ndimage.zoom(order=1)`` of the grid."""
    import numpy as np
    import scipy.ndimage

    tok, grid = old[:, :tokens], old[0, tokens:]
    gs_old = int(np.sqrt(len(grid)))
    grid = grid.reshape(gs_old, gs_old, -1)
    zoom = (gs_new / gs_old, gs_new / gs_old, 1)
    grid = scipy.ndimage.zoom(grid, zoom, order=1)
    return np.concatenate([tok, grid.reshape(1, gs_new * gs_new, -1)], axis=1)


def _big_vision_timm(spec: dict, npz: pathlib.Path, grid: int):
    """timm's VisionTransformer for ``spec`` at ``grid`` x ``grid`` patches with ``npz`` read by its ``_load_weights``."""
    from timm.models.vision_transformer import VisionTransformer, _load_weights

    pool = {"tok": "token", "gap": "avg", "map": "map"}[spec["pool"]]
    model = VisionTransformer(img_size=grid * spec["patch"], patch_size=spec["patch"], embed_dim=spec["width"],
                              depth=spec["depth"], num_heads=spec["heads"], mlp_ratio=spec["mlp"] / spec["width"],
                              class_token=spec["pool"] == "tok", global_pool=pool, fc_norm=False,
                              no_embed_class=spec.get("vintage") != "vision_transformer",
                              act_layer="gelu_tanh", num_classes=5).eval()
    _load_weights(model, str(npz))
    return model


def build_big_vision(spec: dict, out: pathlib.Path) -> None:
    """A random big_vision ViT ``.npz``, read into timm's VisionTransformer by timm's own ``_load_weights``.

    With ``size2``: also the logits at ``size2`` px of the model whose position table big_vision's own
    :func:`resample_posemb` resized (a second ``.npz`` read by timm at that size: timm resizes nothing)."""
    import numpy as np
    import torch

    params = big_vision_params(spec, np.random.default_rng(spec.get("seed", 0)))
    np.savez(out / "model.npz", **params)
    model = _big_vision_timm(spec, out / "model.npz", spec["grid"])
    x = torch.randn(2, 3, spec["grid"] * spec["patch"], spec["grid"] * spec["patch"],
                    generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
    extra = {}
    if spec.get("size2"):
        key = next(k for k in params if k.endswith("pos_embedding"))
        tokens = 1 if spec.get("vintage") == "vision_transformer" else 0
        params[key] = resample_posemb(params[key], spec["size2"] // spec["patch"], tokens).astype("float32")
        np.savez(out / "resampled.npz", **params)
        model2 = _big_vision_timm(spec, out / "resampled.npz", spec["size2"] // spec["patch"])
        x2 = torch.randn(2, 3, spec["size2"], spec["size2"], generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            extra = {"x2": x2.numpy(), "logits2": model2(x2).numpy()}
    np.savez(out / "reference.npz", x=x.numpy(), features=feats.numpy(), logits=logits.numpy(), **extra)


BUILDERS = {"timm": build_timm, "open_clip": build_open_clip, "big_vision": build_big_vision}


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
