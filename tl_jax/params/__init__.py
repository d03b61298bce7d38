"""Transfer: which params train (``param_rules``) and loading pretrained weights (``merge_params``)."""
from tl_jax.params.merge import MergeError, merge_params
from tl_jax.params.param_rules import (ParamRuleError, build_optimizer, label_tree, match_rules, summary_table,
                                         trainable_mask)

__all__ = ["MergeError", "merge_params", "ParamRuleError", "build_optimizer", "label_tree", "match_rules",
           "summary_table", "trainable_mask"]
