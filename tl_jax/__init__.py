"""tl_jax: transfer learning in JAX/Flax. Importing it sets tl_jax's XLA:CPU defaults (tl_jax/util/xla_flags.py)."""
from tl_jax.util import xla_flags as _xla_flags

_xla_flags.apply()
