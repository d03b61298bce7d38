"""Loss functions for transfer learning: classification, multi-task, multi-domain,
distillation, regularisers, domain adaptation and residual adaptation.

Every function is a small pure ``jnp`` function usable under ``jit``/``vmap``/``grad``;
bad static arguments raise ``ValueError`` naming the argument.
"""
from tl_jax.losses.classification import accuracy, cross_entropy, masked_mean
from tl_jax.losses.distill import distillation_loss, kl_softmax
from tl_jax.losses.domain_adaptation import (coral_loss, dann_lambda, domain_adversarial_loss,
                                             gradient_reversal, mmd_loss)
from tl_jax.losses.multidomain import NORMALIZATIONS, multi_domain_loss
from tl_jax.losses.multitask import pcgrad, per_task_grads, uncertainty_weighted, weighted_sum
from tl_jax.losses.regularizers import l1, l2, l2_sp
from tl_jax.losses.residual import (apply_delta, init_lora, lora_dense_delta, merge,
                                    residual_logits)

__all__ = [
    "NORMALIZATIONS",
    "accuracy",
    "apply_delta",
    "coral_loss",
    "cross_entropy",
    "dann_lambda",
    "distillation_loss",
    "domain_adversarial_loss",
    "gradient_reversal",
    "init_lora",
    "kl_softmax",
    "l1",
    "l2",
    "l2_sp",
    "lora_dense_delta",
    "masked_mean",
    "merge",
    "mmd_loss",
    "multi_domain_loss",
    "pcgrad",
    "per_task_grads",
    "residual_logits",
    "uncertainty_weighted",
    "weighted_sum",
]
