"""prism_jax: PRISM dataset distillation (PRIors from diverse Source Models) in JAX/Flax."""

__version__ = "0.1.0"
