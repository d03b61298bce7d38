"""Import pretrained weights from other frameworks (safetensors, PyTorch, npz).

Typical use::

    from tl_jax.weights import convert_weights
    convert_weights("model.safetensors", mapping="bert", model="bert", out="pretrained/minilm",
                    ignore=[r"pooler\\..*"])
    # then: config.model.name = "bert"; config.init_from = "pretrained/minilm"
"""

from tl_jax.weights.convert import SOURCES, Converted, WeightMappingError, convert_weights, map_tensors
from tl_jax.weights.hf_vision import convert_hf_vision  # registers the Hugging Face folder source
from tl_jax.weights.convnext import convert_hf_convnext  # registers the Hugging Face ConvNeXt source
from tl_jax.weights.timm_source import convert_timm  # registers the timm source
from tl_jax.weights.open_clip_source import convert_open_clip  # registers the open_clip source
from tl_jax.weights.big_vision_source import convert_big_vision  # registers the big_vision .npz source
from tl_jax.weights.mappings import MAPPINGS, Mapping, Rule
from tl_jax.weights.readers import FORMATS, read_tensors

__all__ = [
    "FORMATS",
    "MAPPINGS",
    "Converted",
    "Mapping",
    "Rule",
    "SOURCES",
    "WeightMappingError",
    "convert_big_vision",
    "convert_hf_convnext",
    "convert_hf_vision",
    "convert_open_clip",
    "convert_timm",
    "convert_weights",
    "map_tensors",
    "read_tensors",
]
