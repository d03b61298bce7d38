"""Name mappings from other frameworks' tensor names to tl_jax variable paths.

A :class:`Mapping` is an ordered list of :class:`Rule` s: the first rule whose
``pattern`` fully matches a source name gives the target path (``\\1`` ... are
the pattern's groups, e.g. ``layer1.0.bn2.running_var`` ->
``batch_stats/backbone/layer1_0/bn2/var``) and the layout change:

* ``copy``: same layout (biases, LayerNorm/BatchNorm vectors, embedding tables);
* ``linear``: torch ``Linear.weight [out, in]`` -> flax ``Dense`` kernel ``[in, out]``;
* ``conv``: torch ``Conv2d.weight [O, I, kh, kw]`` -> flax ``Conv`` kernel ``[kh, kw, I, O]``.

``buffers`` are source names that hold no weights (``position_ids``,
``num_batches_tracked``) and are dropped. ``infer_kwargs`` reads the model's
architecture from the tensors (and a Hugging Face ``config.json`` next to the
file) so ``--model-kwargs`` is needed only for what cannot be read there.

BatchNorm: torch keeps the *unbiased* batch variance in ``running_var`` and
flax the biased one, but both normalise at inference with the stored value,
so ``running_var`` is copied as is (outputs match exactly); only further
fine-tuning updates it with flax's convention.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import pathlib
import re
from collections.abc import Callable

import numpy as np

log = logging.getLogger("tl_jax")
def transposed(x: np.ndarray, band: int = 64) -> np.ndarray:
    """``x.T`` of a 2-D ``x`` as a new C-contiguous array, copied in bands of ``band`` source rows.

    Why not ``x.T`` (a view) or ``np.ascontiguousarray(x.T)``: a view is copied later anyway (the
    checkpoint writer walks it element by element: ~6x slower), and numpy's copy of ``x.T`` walks
    ``x`` column-wise; in bands each source row is read in 64-element runs (a 3072x768 matrix:
    ~15 ms instead of ~60 ms on this CPU)."""
    x = np.asarray(x)
    out = np.empty((x.shape[1], x.shape[0]), x.dtype)
    for i in range(0, x.shape[0], band):
        out[:, i:i + band] = x[i:i + band].T
    return out


def relayout(tensors: dict[str, np.ndarray], layout: Callable[[str, np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
    """``{name: layout(name, x)}`` computed on every core (at most 8 threads).

    Why threads: numpy's copies release the GIL, and a converter's time is its transposes (a ViT-B/16's
    72 matrices: half the time on 2 cores, BENCHMARKS.md's ``vit`` section)."""
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(tensors, pool.map(layout, tensors, tensors.values())))


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "copy": lambda x: x,
    "linear": lambda x: transposed(x) if x.ndim == 2 else x,
    "conv": lambda x: x.transpose(2, 3, 1, 0) if x.ndim == 4 else x,
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """``pattern`` (regex, fullmatch on the source name) -> ``target`` template, ``transform``."""

    pattern: str
    target: str
    transform: str = "copy"


@dataclasses.dataclass(frozen=True)
class Mapping:
    """A framework's naming scheme for some tl_jax models (see module doc)."""

    name: str
    models: tuple[str, ...]
    rules: tuple[Rule, ...]
    buffers: tuple[str, ...] = ()
    strip_prefixes: tuple[str, ...] = ()
    infer_kwargs: Callable[[dict[str, np.ndarray], pathlib.Path | None], dict] = lambda t, p: {}
    sample_input: Callable[[dict[str, np.ndarray], dict], tuple[tuple, dict]] = lambda t, kwargs: ((), {})

    def normalize(self, name: str) -> str:
        """Source name with a known wrapper prefix (``bert.``) removed."""
        for prefix in self.strip_prefixes:
            if name.startswith(prefix):
                return name[len(prefix):]
        return name

    def is_buffer(self, name: str) -> bool:
        return any(re.fullmatch(b, self.normalize(name)) for b in self.buffers)

    def target(self, name: str) -> tuple[str, str] | None:
        """``(target path, transform)`` of source tensor ``name``, or None if no rule matches."""
        key = self.normalize(name)
        for rule in self.rules:
            m = re.fullmatch(rule.pattern, key)
            if m:
                return m.expand(rule.target), rule.transform
        return None


def _linear(src: str, dst: str) -> list[Rule]:
    return [Rule(rf"{src}\.weight", f"params/{dst}/kernel", "linear"), Rule(rf"{src}\.bias", f"params/{dst}/bias")]


def _layer_norm(src: str, dst: str) -> list[Rule]:
    return [Rule(rf"{src}\.(?:weight|gamma)", f"params/{dst}/scale"),
            Rule(rf"{src}\.(?:bias|beta)", f"params/{dst}/bias")]


def _batch_norm(src: str, dst: str) -> list[Rule]:
    return [Rule(rf"{src}\.weight", f"params/{dst}/scale"), Rule(rf"{src}\.bias", f"params/{dst}/bias"),
            Rule(rf"{src}\.running_mean", f"batch_stats/{dst}/mean"),
            Rule(rf"{src}\.running_var", f"batch_stats/{dst}/var")]


# --- Hugging Face BERT (BertModel / BertForSequenceClassification / sentence-transformers) -------------
_L = r"encoder\.layer\.(\d+)"
_B = "backbone"
BERT_RULES = (
    Rule(r"embeddings\.word_embeddings\.weight", f"params/{_B}/embeddings/word_embeddings/embedding"),
    Rule(r"embeddings\.position_embeddings\.weight", f"params/{_B}/embeddings/position_embeddings/embedding"),
    Rule(r"embeddings\.token_type_embeddings\.weight", f"params/{_B}/embeddings/token_type_embeddings/embedding"),
    *_layer_norm(r"embeddings\.LayerNorm", f"{_B}/embeddings/layer_norm"),
    Rule(rf"{_L}\.attention\.self\.(query|key|value)\.weight", rf"params/{_B}/layer_\1/attention/\2/kernel", "linear"),
    Rule(rf"{_L}\.attention\.self\.(query|key|value)\.bias", rf"params/{_B}/layer_\1/attention/\2/bias"),
    *_linear(rf"{_L}\.attention\.output\.dense", rf"{_B}/layer_\1/attention/output"),
    *_layer_norm(rf"{_L}\.attention\.output\.LayerNorm", rf"{_B}/layer_\1/attention_norm"),
    *_linear(rf"{_L}\.intermediate\.dense", rf"{_B}/layer_\1/intermediate"),
    *_linear(rf"{_L}\.output\.dense", rf"{_B}/layer_\1/output"),
    *_layer_norm(rf"{_L}\.output\.LayerNorm", rf"{_B}/layer_\1/output_norm"),
    *_linear(r"pooler\.dense", f"{_B}/pooler"),
    *_linear(r"classifier", "head"),
)


def _hf_config(path: pathlib.Path | None) -> dict:
    cfg = path.parent / "config.json" if path is not None else None
    if cfg is None or not cfg.is_file():
        return {}
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return {}


def bert_kwargs(tensors: dict[str, np.ndarray], path: pathlib.Path | None) -> dict:
    """Architecture of a BERT checkpoint: shapes, plus heads/eps from a ``config.json`` beside it."""
    t = {BERT.normalize(k): v for k, v in tensors.items()}
    out: dict = {}
    if "embeddings.word_embeddings.weight" in t:
        out["vocab_size"], out["hidden_size"] = t["embeddings.word_embeddings.weight"].shape
    if "embeddings.position_embeddings.weight" in t:
        out["max_position"] = t["embeddings.position_embeddings.weight"].shape[0]
    if "embeddings.token_type_embeddings.weight" in t:
        out["type_vocab_size"] = t["embeddings.token_type_embeddings.weight"].shape[0]
    layers = {int(m.group(1)) for k in t if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    if layers:
        out["num_layers"] = max(layers) + 1
    if "encoder.layer.0.intermediate.dense.weight" in t:
        out["intermediate_size"] = t["encoder.layer.0.intermediate.dense.weight"].shape[0]
    cfg = _hf_config(path)
    if cfg:
        act = cfg.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"{path.parent / 'config.json'}: hidden_act={act!r}; the bert model implements 'gelu'")
        if "num_attention_heads" in cfg:
            out["num_heads"] = int(cfg["num_attention_heads"])
        if "layer_norm_eps" in cfg:
            out["layer_norm_eps"] = float(cfg["layer_norm_eps"])
        log.info("read num_heads / layer_norm_eps from %s", path.parent / "config.json")
    return out


def _bert_sample(tensors: dict[str, np.ndarray], kwargs: dict) -> tuple[tuple, dict]:
    """Token ids ``[1, L]`` and mask for ``model.init`` (shapes only)."""
    length = min(8, int(kwargs.get("max_position", 8)))
    return (np.zeros((1, length), np.int32),), {"attention_mask": np.ones((1, length), np.int32)}


BERT = Mapping("bert", ("bert",), BERT_RULES, buffers=(r"embeddings\.position_ids",), strip_prefixes=("bert.",),
               infer_kwargs=lambda t, p: bert_kwargs(t, p), sample_input=_bert_sample)


# --- torchvision ResNet-18/34/50 -------------------------------------------------------------------------
_RL = r"layer(\d)\.(\d+)"
RESNET_RULES = (
    Rule(r"conv1\.weight", f"params/{_B}/conv1/kernel", "conv"),
    *_batch_norm(r"bn1", f"{_B}/bn1"),
    Rule(rf"{_RL}\.(conv\d)\.weight", rf"params/{_B}/layer\1_\2/\3/kernel", "conv"),
    *_batch_norm(rf"{_RL}\.(bn\d)", rf"{_B}/layer\1_\2/\3"),
    Rule(rf"{_RL}\.downsample\.0\.weight", rf"params/{_B}/layer\1_\2/downsample_conv/kernel", "conv"),
    *_batch_norm(rf"{_RL}\.downsample\.1", rf"{_B}/layer\1_\2/downsample_bn"),
    *_linear(r"fc", "head"),
)


def resnet_kwargs(tensors: dict[str, np.ndarray], path: pathlib.Path | None) -> dict:
    """``base_width`` and ``stem`` (7x7 conv1: 'imagenet', 3x3: 'cifar') from ``conv1.weight``."""
    w = tensors.get("conv1.weight")
    if w is None or w.ndim != 4:
        return {}
    return {"base_width": int(w.shape[0]), "stem": "imagenet" if w.shape[-1] == 7 else "cifar"}


def _resnet_sample(tensors: dict[str, np.ndarray], kwargs: dict) -> tuple[tuple, dict]:
    """An image ``[1, 32, 32, C]`` with C = conv1's input channels (shapes only)."""
    w = tensors.get("conv1.weight")
    channels = int(w.shape[1]) if w is not None and w.ndim == 4 else 3
    return (np.zeros((1, 32, 32, channels), np.float32),), {}


TORCHVISION_RESNET = Mapping("torchvision_resnet", ("resnet18", "resnet50"), RESNET_RULES,
                             buffers=(r".*num_batches_tracked",), infer_kwargs=resnet_kwargs,
                             sample_input=_resnet_sample)

MAPPINGS: dict[str, Mapping] = {m.name: m for m in (BERT, TORCHVISION_RESNET)}
