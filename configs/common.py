"""Shared presets for the experiment files. Experiment files start from `base_config()` and override
only what differs.

The schema (every section with its defaults) and the named presets (recover methods, evaluation
protocols) live in the package, as pure data: `prism_jax/schema/sections.py` and
`prism_jax/schema/presets.py`. Importing this module imports no JAX and no runtime module.
"""

from __future__ import annotations

from prism_jax.schema.presets import (  # noqa: F401  (re-exported for the experiment files)
    PRISM_POOL, PROTOCOLS, RECOVER_METHODS, recover_method_delta, set_protocol, set_recover_method)
from prism_jax.schema.sections import (  # noqa: F401
    STAGES, add_method, base_config, data_config, diffusion_config, evaluate_config, precision_config,
    recover_config, relabel_config, squeeze_config, train_config)
