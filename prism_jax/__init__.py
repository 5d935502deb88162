"""prism_jax: PRISM dataset distillation (PRIors from diverse Source Models) in JAX/Flax.

Importing the package changes no JAX setting; the command line (and the benchmarks) call
`prism_jax.runtime.configure_jax()` once at start-up.
"""

__version__ = "0.1.0"
