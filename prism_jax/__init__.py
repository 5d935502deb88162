"""prism_jax: PRISM dataset distillation (PRIors from diverse Source Models) in JAX/Flax."""

import jax as _jax

# The classic (non-partitionable) threefry compiles model initialization ~4x faster on CPU (one
# RNG computation per tensor). Nothing here draws large *sharded* random arrays, where the
# partitionable variant would matter; per-example keys are derived with fold_in either way.
_jax.config.update("jax_threefry_partitionable", False)

__version__ = "0.1.0"
