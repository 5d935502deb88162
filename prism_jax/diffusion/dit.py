"""DiT (Peebles & Xie 2023): the class-conditional diffusion transformer, in Flax Linen, NHWC.

Layout (as the official `facebookresearch/DiT` models.py, module for module, so that `dit_import`
maps either checkpoint layout one tensor to one variable):
  x_embedder   patchify conv (kernel = stride = patch_size), tokens in row-major patch order
  pos embed    fixed 2-D sin-cos embedding of the patch grid: a constant computed here, not a
               parameter (the official checkpoint stores it as a frozen tensor; the importer only
               checks it)
  t_embedder   sinusoidal features of t (256: the cos half first, then the sin half; max period
               10000) -> fc1 -> SiLU -> fc2
  y_embedder   label table with num_classes + 1 rows; row num_classes is the null class of
               classifier-free guidance (label dropout happens in the training step, not here)
  blocks_i     adaLN-Zero: SiLU(c) -> adaLN_modulation (6D: shift/scale/gate of attention and MLP);
               LayerNorm (eps 1e-6, no affine) -> modulate -> self-attention (fused qkv, proj) -> gate;
               LayerNorm -> modulate -> MLP (fc1, tanh-GELU, fc2) -> gate
  final_layer  SiLU(c) -> adaLN_modulation (2D: shift/scale); LayerNorm -> modulate -> linear to
               p * p * out_channels, then unpatchify with the official (p, q, c) channel order
The output has 2C channels when `learn_sigma` (ε first, then the variance interpolation v), else C.

Choices:
  - `timestep_freq_shift`: the official embedding divides the frequency exponent by half = 128;
    diffusers' DiTTransformer2DModel divides by half - 1 = 127 (`downscale_freq_shift=1`), which
    changes the embedding materially. 0 (default) is the official one, the one the public weights
    were trained with; 1 reproduces diffusers exactly.
  - LayerNorm statistics, attention logits/softmax and the timestep features run in float32
    whatever the compute `dtype`, and every matrix product accumulates into float32 (cast back to
    `dtype` after the bias); parameters stay float32 and the output is float32.
  - `tokens_after` runs the embedders and only the first k blocks (the features of DPS / DAP);
    all methods share the submodules made in `setup`, hence one set of parameters.
Initialization follows the official model (xavier-uniform linears and patch conv, zero biases,
normal(0.02) label table and timestep MLP, zero adaLN modulations and final linear), which matters
when training from scratch.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LAYER_NORM_EPS = 1e-6
TIMESTEP_FEATURES = 256
MAX_PERIOD = 10000.0

# Named sizes (depth, width, heads) of the paper, plus 'T', a tiny CPU size for tests and toy runs.
DIT_SIZES = {
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "T": dict(depth=4, hidden_size=64, num_heads=4),
}

_xavier = nn.initializers.xavier_uniform()
# The official model initializes the patch conv like a linear of the flattened (C * p * p) patch.
_xavier_conv = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1)
_normal_002 = nn.initializers.normal(stddev=0.02)
_zeros = nn.initializers.zeros


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
  """The fixed (grid_size**2, embed_dim) position embedding of the official DiT (MAE's).

  Tokens are in row-major order; the first half of the channels encodes the column, the second half
  the row, each as [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000 ** (-k / (embed_dim / 4)).
  Computed in float64 like the reference, returned as float32.
  """
  if embed_dim % 4:
    raise ValueError(f"hidden_size={embed_dim}: the 2-D sin-cos embedding needs a multiple of 4")
  quarter = embed_dim // 4
  omega = 1.0 / MAX_PERIOD ** (np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                           indexing="ij")

  def encode(positions):
    angles = positions.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)


def timestep_features(t: jax.Array, dim: int = TIMESTEP_FEATURES, freq_shift: int = 0) -> jax.Array:
  """Sinusoidal features of (fractional) timesteps t (B,) -> (B, dim): [cos(t f_k), sin(t f_k)],
  f_k = exp(-ln(10000) k / (dim/2 - freq_shift)); freq_shift 0 is the official DiT, 1 diffusers'."""
  half = dim // 2
  # A constant (float64, rounded once): jitted and eager runs then see the same frequencies, which
  # matters because t up to 999 multiplies any rounding difference.
  exponents = np.arange(half, dtype=np.float64) / (half - freq_shift)
  freqs = np.exp(-np.log(MAX_PERIOD) * exponents).astype(np.float32)
  angles = t.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
  features = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
  if dim % 2:
    features = jnp.pad(features, ((0, 0), (0, 1)))
  return features


def layer_norm(x: jax.Array) -> jax.Array:
  """LayerNorm without affine parameters (eps 1e-6), statistics in float32 with the two-pass variance."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def _dot_general_f32(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """lax.dot_general accumulating into (and returning) float32 whatever the operands' dtype."""
  del preferred_element_type
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=jnp.float32)


def _dense(features: int, dtype: Any, name: str, kernel_init=_xavier, out_dtype: Any = None):
  """A Dense layer (float32 parameters, `dtype` operands) whose product accumulates in float32, the
  bias added in float32, the result cast to `out_dtype` (default: `dtype`). With bf16 operands this is
  both the more accurate product and, on XLA:CPU, the fast one: a bf16 x bf16 -> bf16 dot there runs
  on a slow path, bf16 x bf16 -> f32 on the CPU's bf16 matrix units. Float32 is unchanged by it."""
  layer = nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init, bias_init=_zeros,
                   dot_general=_dot_general_f32, name=name)
  return lambda x: layer(x).astype(dtype if out_dtype is None else out_dtype)


class TimestepEmbedder(nn.Module):
  """t (B,) -> (B, hidden): sinusoidal features -> fc1 -> SiLU -> fc2."""
  hidden_size: int
  freq_shift: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t):
    features = timestep_features(t, TIMESTEP_FEATURES, self.freq_shift).astype(self.dtype)
    h = nn.silu(_dense(self.hidden_size, self.dtype, "fc1", _normal_002)(features))
    return _dense(self.hidden_size, self.dtype, "fc2", _normal_002)(h)


class SelfAttention(nn.Module):
  """Multi-head self-attention with one fused qkv projection (columns: q, k, v; heads contiguous)."""
  hidden_size: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, tokens, _ = x.shape
    head_dim = self.hidden_size // self.num_heads
    qkv = _dense(3 * self.hidden_size, self.dtype, "qkv")(x)
    # Heads before tokens, so both attention products are plain batched matmuls over (B, H): on
    # XLA:CPU the token-major einsums cost twice as much (transposes inside the dot loops).
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
    query, key, value = qkv[0], qkv[1], qkv[2]
    logits = jnp.einsum("bhqd,bhkd->bhqk", query, key, preferred_element_type=jnp.float32)
    logits = logits * (head_dim ** -0.5)
    # Softmax with the normalization applied after the value product (N x d divisions instead of
    # N x N); the max shift carries no gradient (the result does not depend on it).
    unnormalized = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    attended = jnp.einsum("bhqk,bhkd->bhqd", unnormalized.astype(value.dtype), value,
                          preferred_element_type=jnp.float32)
    attended = (attended / jnp.sum(unnormalized, axis=-1, keepdims=True)).astype(value.dtype)
    attended = attended.transpose(0, 2, 1, 3).reshape(batch, tokens, self.hidden_size)
    return _dense(self.hidden_size, self.dtype, "proj")(attended)


class Mlp(nn.Module):
  hidden_size: int
  mlp_hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = jax.nn.gelu(_dense(self.mlp_hidden, self.dtype, "fc1")(x), approximate=True)
    return _dense(self.hidden_size, self.dtype, "fc2")(h)


class DiTBlock(nn.Module):
  """One adaLN-Zero transformer block: tokens (B, N, D), conditioning c (B, D) -> tokens."""
  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    modulation = _dense(6 * self.hidden_size, self.dtype, "adaLN_modulation", _zeros)(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation, 6, axis=-1)
    attn = SelfAttention(self.hidden_size, self.num_heads, self.dtype, name="attn")
    x = x + gate_msa[:, None, :] * attn(modulate(layer_norm(x), shift_msa, scale_msa))
    mlp = Mlp(self.hidden_size, int(self.hidden_size * self.mlp_ratio), self.dtype, name="mlp")
    return x + gate_mlp[:, None, :] * mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
  """Tokens (B, N, D), c (B, D) -> (B, N, p * p * out_channels)."""
  hidden_size: int
  patch_outputs: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    modulation = _dense(2 * self.hidden_size, self.dtype, "adaLN_modulation", _zeros)(nn.silu(c))
    shift, scale = jnp.split(modulation, 2, axis=-1)
    return _dense(self.patch_outputs, self.dtype, "linear", _zeros, out_dtype=jnp.float32)(
        modulate(layer_norm(x), shift, scale))


class DiT(nn.Module):
  """Class-conditional diffusion transformer. `__call__(x, t, y)`: x (B, H, W, C) with H = W =
  input_size, t (B,) timesteps in [0, 999] (int or float), y (B,) labels (num_classes = null class)
  -> (B, H, W, 2C) if learn_sigma (ε, then v) else (B, H, W, C), float32."""
  input_size: int
  patch_size: int
  in_channels: int
  hidden_size: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  learn_sigma: bool = True
  timestep_freq_shift: int = 0
  dtype: Any = jnp.float32

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @property
  def grid_size(self) -> int:
    return self.input_size // self.patch_size

  def setup(self):
    p, dtype = self.patch_size, self.dtype
    self.x_embedder = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=dtype,
                              param_dtype=jnp.float32, kernel_init=_xavier_conv, bias_init=_zeros)
    self.t_embedder = TimestepEmbedder(self.hidden_size, self.timestep_freq_shift, dtype)
    self.y_embedder = nn.Embed(self.num_classes + 1, self.hidden_size, dtype=dtype, param_dtype=jnp.float32,
                               embedding_init=_normal_002)
    self.blocks = [DiTBlock(self.hidden_size, self.num_heads, self.mlp_ratio, dtype)
                   for _ in range(self.depth)]
    self.final_layer = FinalLayer(self.hidden_size, p * p * self.out_channels, dtype)

  def _check_inputs(self, x, t, y):
    want = (self.input_size, self.input_size, self.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
      raise ValueError(f"x of shape {tuple(x.shape)}: expected (B, {want[0]}, {want[1]}, {want[2]}) "
                       f"(input_size={self.input_size}, in_channels={self.in_channels})")
    batch = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t), (batch,))
    y = jnp.broadcast_to(jnp.asarray(y), (batch,))
    if not jnp.issubdtype(y.dtype, jnp.integer):
      raise ValueError(f"y has dtype {y.dtype}: expected integer class labels "
                       f"(null class = {self.num_classes})")
    return t, y

  def embed(self, x, t, y):
    """Patch tokens plus position embedding (B, N, D) and the conditioning c = t_emb + y_emb (B, D)."""
    t, y = self._check_inputs(x, t, y)
    tokens = self.x_embedder(x.astype(self.dtype))
    tokens = tokens.reshape(tokens.shape[0], -1, self.hidden_size)
    pos = jnp.asarray(sincos_pos_embed_2d(self.hidden_size, self.grid_size), self.dtype)
    conditioning = self.t_embedder(t) + self.y_embedder(y)
    return tokens + pos[None], conditioning

  def _check_num_blocks(self, num_blocks) -> int:
    is_int = isinstance(num_blocks, (int, np.integer)) and not isinstance(num_blocks, bool)
    if not is_int or not 1 <= num_blocks <= self.depth:
      raise ValueError(f"num_blocks={num_blocks!r}: expected an int in 1..{self.depth} (the model's depth)")
    return int(num_blocks)

  def tokens_after(self, x, t, y, num_blocks: int):
    """Tokens (B, N, D) after the first `num_blocks` blocks; runs only those blocks."""
    num_blocks = self._check_num_blocks(num_blocks)
    tokens, conditioning = self.embed(x, t, y)
    for block in self.blocks[:num_blocks]:
      tokens = block(tokens, conditioning)
    return tokens

  def output_and_tokens(self, x, t, y, num_blocks: int):
    """(the `__call__` output, tokens after the first `num_blocks` blocks) from one forward pass."""
    num_blocks = self._check_num_blocks(num_blocks)
    tokens, conditioning = self.embed(x, t, y)
    features = None
    for index, block in enumerate(self.blocks, start=1):
      tokens = block(tokens, conditioning)
      if index == num_blocks:
        features = tokens
    return self._head(tokens, conditioning), features

  def __call__(self, x, t, y):
    tokens, conditioning = self.embed(x, t, y)
    for block in self.blocks:
      tokens = block(tokens, conditioning)
    return self._head(tokens, conditioning)

  def _head(self, tokens, conditioning):
    return self.unpatchify(self.final_layer(tokens, conditioning).astype(jnp.float32))

  def unpatchify(self, patches):
    """(B, N, p * p * C) with per-token channels in (p, q, c) order -> (B, H, W, C)."""
    batch, p, grid, channels = patches.shape[0], self.patch_size, self.grid_size, self.out_channels
    patches = patches.reshape(batch, grid, grid, p, p, channels)
    return patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, grid * p, grid * p, channels)


SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(DiT) if f.name not in ("dtype", "parent", "name"))
_REQUIRED_FIELDS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads")
_NAME_PATTERN = re.compile(r"^(?:DiT-)?([A-Za-z]+)/([0-9]+)$")


def check_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
  """Validates a DiT spec (constructor kwargs), returned with python types; ValueError names the field."""
  unknown = sorted(set(spec) - set(SPEC_FIELDS))
  if unknown:
    raise ValueError(f"DiT spec has unknown field(s) {unknown}; known: {', '.join(SPEC_FIELDS)}")
  missing = [f for f in _REQUIRED_FIELDS if f not in spec]
  if missing:
    raise ValueError(f"DiT spec lacks field(s) {missing}")
  kwargs = dict(spec)
  for field in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes",
                "timestep_freq_shift"):
    if field in kwargs:
      value = kwargs[field]
      try:
        is_integer = not isinstance(value, (bool, str)) and int(value) == value
      except (TypeError, ValueError, OverflowError):
        is_integer = False
      if not is_integer:
        raise ValueError(f"DiT spec {field}={value!r}: expected an integer")
      kwargs[field] = int(value)
  for field in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads"):
    if kwargs[field] < 1:
      raise ValueError(f"DiT spec {field}={kwargs[field]}: expected a positive integer")
  if "num_classes" in kwargs and kwargs["num_classes"] < 1:
    raise ValueError(f"DiT spec num_classes={kwargs['num_classes']}: expected a positive integer")
  if "mlp_ratio" in kwargs:
    if isinstance(kwargs["mlp_ratio"], bool) or not isinstance(kwargs["mlp_ratio"], (int, float, np.number)):
      raise ValueError(f"DiT spec mlp_ratio={kwargs['mlp_ratio']!r}: expected a number")
    kwargs["mlp_ratio"] = float(kwargs["mlp_ratio"])
    if kwargs["mlp_ratio"] <= 0:
      raise ValueError(f"DiT spec mlp_ratio={kwargs['mlp_ratio']}: expected > 0")
  if "learn_sigma" in kwargs:
    if not isinstance(kwargs["learn_sigma"], (bool, np.bool_)):
      raise ValueError(f"DiT spec learn_sigma={kwargs['learn_sigma']!r}: expected true or false")
    kwargs["learn_sigma"] = bool(kwargs["learn_sigma"])
  if kwargs.get("timestep_freq_shift", 0) not in (0, 1):
    raise ValueError(f"DiT spec timestep_freq_shift={kwargs['timestep_freq_shift']}: expected 0 (official) "
                     "or 1 (diffusers)")
  if kwargs["input_size"] % kwargs["patch_size"]:
    raise ValueError(f"DiT spec input_size={kwargs['input_size']} is not divisible by "
                     f"patch_size={kwargs['patch_size']}")
  if kwargs["hidden_size"] % kwargs["num_heads"]:
    raise ValueError(f"DiT spec hidden_size={kwargs['hidden_size']} is not divisible by "
                     f"num_heads={kwargs['num_heads']}")
  if kwargs["hidden_size"] % 4:
    raise ValueError(f"DiT spec hidden_size={kwargs['hidden_size']}: the 2-D sin-cos position embedding "
                     "needs a multiple of 4")
  return kwargs


def dit_spec(name: str, *, input_size: int, in_channels: int, num_classes: int,
             learn_sigma: bool = True) -> dict[str, Any]:
  """Constructor kwargs of a named size: 'XL/2', 'L/4', 'B/8', 'S/2', 'T/2' (optionally 'DiT-XL/2')."""
  match = _NAME_PATTERN.match(str(name))
  if not match or match.group(1) not in DIT_SIZES or int(match.group(2)) < 1:
    raise ValueError(f"name={name!r}: expected '<size>/<patch>' with size in {', '.join(DIT_SIZES)} and a "
                     "positive patch size, e.g. 'XL/2'")
  spec = dict(input_size=input_size, patch_size=int(match.group(2)), in_channels=in_channels,
              **DIT_SIZES[match.group(1)], mlp_ratio=4.0, num_classes=num_classes, learn_sigma=learn_sigma)
  return check_spec(spec)


def create_dit(spec: Mapping[str, Any], dtype: Any = jnp.float32) -> DiT:
  """A DiT from a spec (e.g. one read back from a diffusion_store model.json); `dtype` = compute dtype."""
  return DiT(**check_spec(spec), dtype=dtype)


def abstract_variables(model: DiT) -> Any:
  """The variables' shapes (jax.ShapeDtypeStruct) of `model`, without allocating them."""
  x = jax.ShapeDtypeStruct((1, model.input_size, model.input_size, model.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  y = jax.ShapeDtypeStruct((1,), jnp.int32)
  return jax.eval_shape(lambda x, t, y: model.init(jax.random.key(0), x, t, y), x, t, y)


def init_dit(model: DiT, key: jax.Array) -> dict[str, Any]:
  """Fresh variables ({'params': ...}) with the official initialization (jitted: one compilation instead
  of one per operation, which matters for the large sizes)."""
  x = jnp.zeros((1, model.input_size, model.input_size, model.in_channels), jnp.float32)
  return jax.jit(model.init)(key, x, jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.int32))
