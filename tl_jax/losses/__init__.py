"""The pure loss functions of every method, in one namespace for users' scripts.

They live with their method in :mod:`tl_jax.objectives` (one module per method);
this module only re-exports them. Every function is a small pure ``jnp``
function usable under ``jit``/``vmap``/``grad``; bad static arguments raise
``ValueError`` naming the argument.
"""
from tl_jax.objectives.bss import bss_loss
from tl_jax.objectives.cdan import cdan_loss, multilinear_map, randomized_multilinear_map
from tl_jax.objectives.classification import accuracy, cross_entropy, entropy, masked_mean, soft_cross_entropy
from tl_jax.objectives.co_tuning import category_relationship, co_tuning_loss
from tl_jax.objectives.coral_mmd import coral_loss, mmd_loss
from tl_jax.objectives.dann import domain_adversarial_loss
from tl_jax.objectives.delta import channel_loss_increase, delta_attention, delta_loss
from tl_jax.objectives.distill import distillation_loss, kl_softmax
from tl_jax.objectives.domain_adaptation import dann_lambda, gradient_reversal
from tl_jax.objectives.feature_distill import attention_map, attention_transfer_loss, hint_loss
from tl_jax.objectives.joint import joint_loss
from tl_jax.objectives.mcc import mcc_loss
from tl_jax.objectives.mdd import mdd_loss
from tl_jax.objectives.multidomain import NORMALIZATIONS, multi_domain_loss
from tl_jax.objectives.multitask import uncertainty_weighted, weighted_sum
from tl_jax.objectives.pcgrad import pcgrad, per_task_grads
from tl_jax.objectives.regularizers import l1, l2, l2_sp
from tl_jax.objectives.residual_output import residual_logits
from tl_jax.objectives.residual_params import apply_delta, init_lora, lora_dense_delta, merge
from tl_jax.objectives.self_training import fixmatch_loss

__all__ = [
    "NORMALIZATIONS", "accuracy", "apply_delta", "attention_map", "attention_transfer_loss", "bss_loss",
    "category_relationship", "cdan_loss", "channel_loss_increase", "co_tuning_loss", "coral_loss",
    "cross_entropy", "dann_lambda", "delta_attention", "delta_loss", "distillation_loss",
    "domain_adversarial_loss", "entropy", "fixmatch_loss", "gradient_reversal", "hint_loss", "init_lora",
    "joint_loss", "kl_softmax", "l1", "l2", "l2_sp", "lora_dense_delta", "masked_mean", "mcc_loss", "mdd_loss",
    "merge", "mmd_loss", "multi_domain_loss", "multilinear_map", "pcgrad", "per_task_grads",
    "randomized_multilinear_map", "residual_logits", "soft_cross_entropy", "uncertainty_weighted", "weighted_sum",
]
