"""Precision policy per stage: parameter dtype, compute dtype and matmul/convolution precision.

`config.precision.<stage>` (squeeze, recover, relabel, train) has three fields:
  param_dtype       'float32' (parameters, BatchNorm statistics and optimizer state are always
                    float32; the field exists so a config says so explicitly)
  compute_dtype     'auto' | 'float32' | 'bfloat16': the dtype of activations, convolutions and
                    matmuls (the models' `dtype`); BatchNorm statistics, softmax and losses are
                    computed in float32 whatever it is
  matmul_precision  'auto' | 'default' | 'high' | 'highest': jax.default_matmul_precision for
                    every convolution and matmul the stage traces. On TPU 'default' runs float32
                    products at bfloat16 precision and on recent GPUs at TF32; 'highest' is full
                    float32.
'auto' resolves per backend:
  CPU:      float32 compute, default precision (already full float32): today's results bit for bit.
  GPU/TPU:  recover float32 compute with 'highest' precision, so the BatchNorm-statistics matching
            and the parity with the official loss survive; squeeze, relabel and train bfloat16
            compute with default precision (float32 parameters, BN statistics, optimizer state).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from prism_jax import errors
from prism_jax.schema import sections

STAGES = sections.PRECISION_STAGES
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MATMUL_PRECISIONS = ("default", "high", "highest")


precision_config = sections.precision_config  # the schema of config.precision


@dataclasses.dataclass(frozen=True)
class Policy:
  stage: str
  compute_dtype: Any            # jnp.float32 or jnp.bfloat16
  matmul_precision: str         # 'default' (no override), 'high' or 'highest'

  @property
  def compute_dtype_name(self) -> str:
    return jnp.dtype(self.compute_dtype).name

  @property
  def is_float32_default(self) -> bool:
    """True for the policy that leaves every program exactly as without a policy."""
    return self.compute_dtype == jnp.float32 and self.matmul_precision == "default"

  def scope(self):
    """Context in which the stage's programs are traced (and so compiled)."""
    if self.matmul_precision == "default":
      return contextlib.nullcontext()
    return jax.default_matmul_precision(self.matmul_precision)

  def fingerprint(self) -> dict:
    """Recorded with a stage's artifacts; empty for the float32 default, so artifacts made before
    the policy existed keep matching."""
    if self.is_float32_default:
      return {}
    return {"precision": {"compute_dtype": self.compute_dtype_name, "matmul_precision": self.matmul_precision}}

  def describe(self) -> str:
    return f"{self.compute_dtype_name} compute, {self.matmul_precision} matmul precision"


def _section(config, stage: str):
  precision = config.get("precision") if hasattr(config, "get") else None
  if precision is None:  # a config built before the policy existed: the defaults
    return precision_config()[stage]
  if stage not in precision:
    raise errors.ConfigError(f"config.precision.{stage} is missing: expected fields param_dtype, compute_dtype, "
                     "matmul_precision")
  return precision[stage]


def validate(config) -> None:
  """Raises ValueError naming the first invalid `config.precision` field."""
  for stage in STAGES:
    s = _section(config, stage)
    if s.param_dtype != "float32":
      raise errors.ConfigError(f"config.precision.{stage}.param_dtype={s.param_dtype!r}: expected 'float32' "
                       "(parameters, BatchNorm statistics and optimizer state are kept in float32; "
                       "use compute_dtype='bfloat16' for faster compute)")
    if s.compute_dtype != "auto" and s.compute_dtype not in COMPUTE_DTYPES:
      raise errors.ConfigError(f"config.precision.{stage}.compute_dtype={s.compute_dtype!r}: expected 'auto', "
                       f"{', '.join(repr(d) for d in COMPUTE_DTYPES)}")
    if s.matmul_precision != "auto" and s.matmul_precision not in MATMUL_PRECISIONS:
      raise errors.ConfigError(f"config.precision.{stage}.matmul_precision={s.matmul_precision!r}: expected 'auto', "
                       f"{', '.join(repr(p) for p in MATMUL_PRECISIONS)}")


def resolve(config, stage: str, backend: str | None = None) -> Policy:
  """The policy of `stage` with 'auto' resolved for `backend` (default: JAX's default backend)."""
  if stage not in STAGES:
    raise errors.ConfigError(f"precision stage {stage!r}: expected one of {STAGES}")
  validate(config)
  s = _section(config, stage)
  backend = backend or jax.default_backend()
  accelerator = backend != "cpu"
  compute = s.compute_dtype
  if compute == "auto":
    compute = "bfloat16" if accelerator and stage != "recover" else "float32"
  matmul = s.matmul_precision
  if matmul == "auto":
    matmul = "highest" if accelerator and stage == "recover" else "default"
  return Policy(stage=stage, compute_dtype=COMPUTE_DTYPES[compute], matmul_precision=matmul)
