"""How a batch feeds a model: which keys are its positional and keyword inputs.

Images go in as ``model(image)``; text as ``model(input_ids, attention_mask=mask)``.
The models' own home for this rule, so that :mod:`tl_jax.models.registry` need not
import the objectives (which import the models).
"""
from __future__ import annotations

from typing import Any, Mapping


def model_inputs(batch: Mapping[str, Any]) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a batch: ``((image,), {})`` or ``((input_ids,), {'attention_mask': mask})``.

    Raises:
        KeyError: the batch holds neither ``'image'`` nor ``'input_ids'``.
    """
    if "image" in batch:
        return (batch["image"],), {}
    if "input_ids" in batch:
        return (batch["input_ids"],), {"attention_mask": batch.get("attention_mask")}
    raise KeyError(f"batch has no model input ('image' or 'input_ids'); keys: {sorted(batch)}")
