"""DiT: parity with diffusers' DiTTransformer2DModel (random weights, fp32), the official checkpoint layout,
the XL/2 key map on torch's meta device, intermediate tokens, jit/vmap/sharding, bad input and the CLI.

The reference is tiny (8 px, patch 2, 2 blocks, 2 heads x 32) with every parameter randomized: diffusers'
own init leaves the adaLN-Zero layers at zero, where a wrong modulation order would go unnoticed.
"""

import copy
import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed

from prism_jax.diffusion import dit, dit_import
from prism_jax.io import artifacts, diffusion_store
from prism_jax.parallel import mesh as mesh_lib
from prism_jax.tools import import_dit

torch.set_num_threads(1)

NUM_CLASSES, SIZE, PATCH, CHANNELS, DEPTH, HEADS, HEAD_DIM = 10, 8, 2, 4, 2, 2, 32
HIDDEN = HEADS * HEAD_DIM
TIMESTEPS = np.array([0, 1, 17.5, 250, 640, 999], np.float32)
LABELS = np.array([0, 3, 9, NUM_CLASSES, NUM_CLASSES, 5], np.int64)  # includes the null class
XL_CONFIG = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                 sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
# train.py of facebookresearch/DiT logs "DiT Parameters: 675,129,632" for XL/2 at 256 px (it counts the
# frozen pos_embed, 256 x 1152, which we compute instead of storing).
OFFICIAL_XL2_PARAMETERS = 675_129_632


def _assert_close(actual, expected, what: str, rel: float = 1e-4) -> float:
  expected = np.asarray(expected, np.float64)
  tol = rel * max(1.0, float(np.max(np.abs(expected))))
  err = float(np.max(np.abs(np.asarray(actual, np.float64) - expected)))
  assert err <= tol, f"{what}: max abs diff {err:.3g} > tolerance {tol:.3g}"
  return err


@functools.lru_cache(maxsize=1)
def _reference():
  """A diffusers DiT with all parameters random and the per-block embedder copies tied to block 0's."""
  torch.manual_seed(0)
  # norm_eps=1e-6 as the official DiT (diffusers' default 1e-5 applies to the MLP-branch LayerNorm only).
  model = DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=CHANNELS,
                                out_channels=2 * CHANNELS, num_layers=DEPTH, sample_size=SIZE, patch_size=PATCH,
                                num_embeds_ada_norm=NUM_CLASSES, norm_eps=1e-6)
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("embedding_table.weight"):
        param.copy_(torch.randn(param.shape, generator=gen))
      elif param.ndim >= 2:
        fan_in = param[0].numel()
        param.copy_(torch.randn(param.shape, generator=gen) / fan_in ** 0.5)
      else:
        param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
      block.norm1.emb.load_state_dict(first)
  return model.eval()


def _numpy_state_dict(model) -> dict:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _inputs(batch: int = len(TIMESTEPS), seed: int = 0):
  return np.random.default_rng(seed).normal(size=(batch, SIZE, SIZE, CHANNELS)).astype(np.float32)


def _torch_forward(model, x_nhwc, t, y):
  with torch.no_grad():
    out = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()), timestep=torch.from_numpy(t),
                class_labels=torch.from_numpy(y)).sample
  return out.numpy().transpose(0, 2, 3, 1)


def _official_state_dict(diffusers_sd: dict, depth: int, hidden: int, grid: int) -> dict:
  """Test-side renaming of a diffusers DiT state_dict into the official layout (torch tensors, also on
  the meta device): to_q/to_k/to_v concatenated into qkv, block 0's embedders as the model's, plus the
  frozen pos_embed (diffusers' own sin-cos function). Asserts that every diffusers key is used or is a
  per-block embedder copy."""
  used, official = set(), {}

  def take(src, dst):
    official[dst] = diffusers_sd[src]
    used.add(src)

  for suffix in ("weight", "bias"):
    take(f"pos_embed.proj.{suffix}", f"x_embedder.proj.{suffix}")
    emb = "transformer_blocks.0.norm1.emb.timestep_embedder"
    take(f"{emb}.linear_1.{suffix}", f"t_embedder.mlp.0.{suffix}")
    take(f"{emb}.linear_2.{suffix}", f"t_embedder.mlp.2.{suffix}")
    for i in range(depth):
      tp = f"transformer_blocks.{i}"
      take(f"{tp}.norm1.linear.{suffix}", f"blocks.{i}.adaLN_modulation.1.{suffix}")
      parts = [f"{tp}.attn1.to_{n}.{suffix}" for n in "qkv"]
      official[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat([diffusers_sd[p] for p in parts], dim=0)
      used.update(parts)
      take(f"{tp}.attn1.to_out.0.{suffix}", f"blocks.{i}.attn.proj.{suffix}")
      take(f"{tp}.ff.net.0.proj.{suffix}", f"blocks.{i}.mlp.fc1.{suffix}")
      take(f"{tp}.ff.net.2.{suffix}", f"blocks.{i}.mlp.fc2.{suffix}")
    take(f"proj_out_1.{suffix}", f"final_layer.adaLN_modulation.1.{suffix}")
    take(f"proj_out_2.{suffix}", f"final_layer.linear.{suffix}")
  take("transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight",
       "y_embedder.embedding_table.weight")
  sample = next(iter(diffusers_sd.values()))
  if sample.device.type == "meta":
    official["pos_embed"] = torch.empty((1, grid * grid, hidden), device="meta")
  else:
    pos_embed = get_2d_sincos_pos_embed(hidden, grid, base_size=grid, output_type="pt")
    official["pos_embed"] = pos_embed[None].float()
  leftover = [k for k in diffusers_sd if k not in used and not (".norm1.emb." in k and not k.startswith(
      "transformer_blocks.0."))]
  assert not leftover, f"renaming misses {leftover}"
  return official


def _diffusers_spec(**overrides):
  spec = dit_import.infer_dit_spec(_numpy_state_dict(_reference()), "diffusers", config=_reference().config)
  return {**spec, **overrides}


def _apply(spec, variables, x, t=TIMESTEPS, y=LABELS, **kwargs):
  model = dit.create_dit(spec)
  out = model.apply(variables, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y, jnp.int32), **kwargs)
  return np.asarray(out)


def test_infer_spec_from_diffusers_weights_and_config():
  spec = _diffusers_spec()
  assert spec == dict(input_size=SIZE, patch_size=PATCH, in_channels=CHANNELS, hidden_size=HIDDEN, depth=DEPTH,
                      num_heads=HEADS, mlp_ratio=4.0, num_classes=NUM_CLASSES, learn_sigma=True,
                      timestep_freq_shift=0)
  state_dict = _numpy_state_dict(_reference())
  # Without a config: the standard head count of the width, and no input_size (diffusers stores no pos_embed).
  with pytest.raises(ValueError, match="input_size cannot be inferred"):
    dit_import.infer_dit_spec(state_dict, "diffusers")
  standard = dit_import.STANDARD_HEADS[HIDDEN]
  assert dit_import.infer_dit_spec(state_dict, input_size=SIZE)["num_heads"] == standard
  assert dit_import.infer_dit_spec(state_dict, input_size=SIZE, num_heads=8)["num_heads"] == 8
  with pytest.raises(ValueError, match="config num_layers=3 differs from the weights"):
    dit_import.infer_dit_spec(state_dict, config={**_reference().config, "num_layers": 3})
  with pytest.raises(ValueError, match="attention_head_dim=16 x num_heads=2"):
    dit_import.infer_dit_spec(state_dict, config={**_reference().config, "attention_head_dim": 16})


@pytest.mark.usefixtures("optimized_xla")  # parity as users run it
def test_epsilon_sigma_and_cfg_match_diffusers():
  reference = _reference()
  spec = _diffusers_spec(timestep_freq_shift=1)  # diffusers' timestep embedding, for exact parity
  variables = dit_import.state_dict_to_variables(_numpy_state_dict(reference), spec, "diffusers")
  x = _inputs()
  expected = _torch_forward(reference, x, TIMESTEPS, LABELS)
  ours = _apply(spec, variables, x)
  assert ours.shape == (len(TIMESTEPS), SIZE, SIZE, 2 * CHANNELS) and float(np.std(expected)) > 0.3
  _assert_close(ours[..., :CHANNELS], expected[..., :CHANNELS], "epsilon")
  _assert_close(ours[..., CHANNELS:], expected[..., CHANNELS:], "sigma (variance interpolation)")

  null = np.full_like(LABELS, NUM_CLASSES)
  labels = np.array([0, 3, 9, 1, 7, 5])
  scale = 4.0
  ref_cond = _torch_forward(reference, x, TIMESTEPS, labels)
  ref_uncond = _torch_forward(reference, x, TIMESTEPS, null)
  our_cond, our_uncond = _apply(spec, variables, x, y=labels), _apply(spec, variables, x, y=null)
  ref_cfg = ref_uncond[..., :CHANNELS] + scale * (ref_cond[..., :CHANNELS] - ref_uncond[..., :CHANNELS])
  our_cfg = our_uncond[..., :CHANNELS] + scale * (our_cond[..., :CHANNELS] - our_uncond[..., :CHANNELS])
  assert float(np.max(np.abs(ref_cond - ref_uncond))) > 0.1  # the label matters
  _assert_close(our_cfg, ref_cfg, "classifier-free guided epsilon")

  # The embedding variant is not a detail: the official one (shift 0) is far from diffusers' outputs.
  official_embedding = _apply({**spec, "timestep_freq_shift": 0}, variables, x)
  assert float(np.max(np.abs(official_embedding - expected))) > 1e-2 * float(np.max(np.abs(expected)))


@pytest.mark.usefixtures("optimized_xla")  # parity as users run it
def test_tokens_after_match_diffusers_hidden_states():
  reference = _reference()
  spec = _diffusers_spec(timestep_freq_shift=1)
  variables = dit_import.state_dict_to_variables(_numpy_state_dict(reference), spec, "diffusers")
  x = _inputs()
  captured = []
  handles = [block.register_forward_hook(lambda module, args, out: captured.append(out.detach().numpy()))
             for block in reference.transformer_blocks]
  try:
    _torch_forward(reference, x, TIMESTEPS, LABELS)
  finally:
    for handle in handles:
      handle.remove()
  for k in range(1, DEPTH + 1):
    tokens = _apply(spec, variables, x, num_blocks=k, method=dit.DiT.tokens_after)
    assert tokens.shape == (len(TIMESTEPS), (SIZE // PATCH) ** 2, HIDDEN)
    _assert_close(tokens, captured[k - 1], f"tokens after block {k}")


@pytest.mark.usefixtures("optimized_xla")  # parity as users run it
def test_official_layout_gives_the_same_variables_and_official_outputs():
  reference = _reference()
  diffusers_sd = _numpy_state_dict(reference)
  torch_sd = {k: v.detach() for k, v in reference.state_dict().items()}
  renamed = _official_state_dict(torch_sd, DEPTH, HIDDEN, SIZE // PATCH)
  official_sd = {k: v.numpy() for k, v in renamed.items()}
  assert dit_import.detect_layout(official_sd) == "official"
  assert dit_import.detect_layout(diffusers_sd) == "diffusers"
  spec = dit_import.infer_dit_spec(official_sd, num_heads=HEADS)
  assert spec == _diffusers_spec()
  from_official = dit_import.state_dict_to_variables(official_sd, spec)
  from_diffusers = dit_import.state_dict_to_variables(diffusers_sd, spec)
  flat_official = jax.tree_util.tree_flatten_with_path(from_official)[0]
  flat_diffusers = jax.tree_util.tree_flatten_with_path(from_diffusers)[0]
  assert [p for p, _ in flat_official] == [p for p, _ in flat_diffusers]
  assert len(flat_official) == 7 + 10 * DEPTH + 4  # embedders, 10 tensors per block, final layer
  for (path, a), (_, b) in zip(flat_official, flat_diffusers):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))

  # The official timestep embedding (shift 0) = diffusers with its frequency shift set to the official 0.
  official_reference = copy.deepcopy(reference)
  for block in official_reference.transformer_blocks:
    block.norm1.emb.time_proj.downscale_freq_shift = 0
  x = _inputs(seed=1)
  _assert_close(_apply(spec, from_official, x), _torch_forward(official_reference, x, TIMESTEPS, LABELS),
                "official-layout output")

  bad = dict(official_sd, pos_embed=official_sd["pos_embed"] + 1e-2)
  with pytest.raises(ValueError, match="'pos_embed' differs from the fixed 2-D sin-cos"):
    dit_import.state_dict_to_variables(bad, spec)


def test_pos_embed_matches_the_reference_function():
  for hidden, grid in ((64, 4), (1152, 16), (384, 8)):
    expected = get_2d_sincos_pos_embed(hidden, grid, base_size=grid, output_type="pt").numpy()
    np.testing.assert_allclose(dit.sincos_pos_embed_2d(hidden, grid), expected, atol=1e-6)


def test_xl2_key_map_and_parameter_count_on_meta_device():
  with torch.device("meta"):
    reference = DiTTransformer2DModel(**XL_CONFIG)
  meta_sd = reference.state_dict()
  shapes = {k: tuple(v.shape) for k, v in meta_sd.items()}
  spec = dit.dit_spec("XL/2", input_size=32, in_channels=4, num_classes=1000)
  assert dit_import.expected_state_dict_shapes(spec, "diffusers") == shapes
  official = _official_state_dict(meta_sd, 28, 1152, 16)
  official_shapes = {k: tuple(v.shape) for k, v in official.items()}
  assert dit_import.expected_state_dict_shapes(spec, "official") == official_shapes

  # Inference from shapes alone (zero-stride arrays: nothing allocated).
  shape_only = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
  assert dit_import.infer_dit_spec(shape_only, config=reference.config) == {**spec, "timestep_freq_shift": 0}
  official_only = {k: np.broadcast_to(np.float32(0), s) for k, s in official_shapes.items()}
  assert dit_import.infer_dit_spec(official_only) == {**spec, "timestep_freq_shift": 0}

  abstract = dit.abstract_variables(dit.create_dit(spec))
  ours = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(abstract))
  official_count = sum(int(np.prod(s)) for s in official_shapes.values())
  assert ours + 256 * 1152 == official_count == OFFICIAL_XL2_PARAMETERS
  # diffusers stores the timestep + label embedders once per block: 27 extra copies.
  copy_size = 256 * 1152 + 1152 + 1152 * 1152 + 1152 + 1001 * 1152
  assert sum(int(np.prod(s)) for s in shapes.values()) == ours + 27 * copy_size


def test_tokens_shapes_determinism_jit_vmap_and_grad():
  # The reference's shapes (random, non-zero parameters): the parity tests' compiled eager ops are reused.
  spec = _diffusers_spec(timestep_freq_shift=1)
  model = dit.create_dit(spec)
  variables = dit_import.state_dict_to_variables(_numpy_state_dict(_reference()), spec)
  x = jnp.asarray(_inputs())
  t, y = jnp.asarray(TIMESTEPS), jnp.asarray(LABELS, jnp.int32)

  forward = jax.jit(model.apply)
  out = forward(variables, x, t, y)
  assert out.shape == (len(TIMESTEPS), SIZE, SIZE, 2 * CHANNELS) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, forward(variables, x, t, y))  # deterministic
  np.testing.assert_allclose(model.apply(variables, x, t, y), out, rtol=1e-5, atol=1e-5)  # jit = no jit

  @functools.partial(jax.jit, static_argnames="k")
  def tokens_after(params, images, k):
    return model.apply(params, images, t, y, num_blocks=k, method=dit.DiT.tokens_after)

  both, tokens_1 = jax.jit(functools.partial(model.apply, num_blocks=1, method=dit.DiT.output_and_tokens))(
      variables, x, t, y)
  np.testing.assert_allclose(both, out, rtol=1e-5, atol=1e-5)
  tokens = {k: tokens_after(variables, x, k) for k in (1, 2)}
  assert all(v.shape == (len(TIMESTEPS), (SIZE // PATCH) ** 2, HIDDEN) for v in tokens.values())
  np.testing.assert_allclose(tokens[1], tokens_1, rtol=1e-5, atol=1e-5)
  eager_tokens = model.apply(variables, x, t, y, num_blocks=1, method=dit.DiT.tokens_after)
  np.testing.assert_allclose(tokens[1], eager_tokens, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(tokens[1] - tokens[2]))) > 1e-2  # k changes the features
  # Only the first k blocks run: NaN in the second block leaves the tokens after the first one unchanged.
  poisoned = jax.tree_util.tree_map(lambda a: a, variables)
  poisoned["params"]["blocks_1"] = jax.tree_util.tree_map(lambda a: np.full_like(a, np.nan),
                                                          variables["params"]["blocks_1"])
  np.testing.assert_array_equal(tokens_after(poisoned, x, 1), tokens[1])
  assert bool(jnp.all(jnp.isnan(tokens_after(poisoned, x, 2))))

  stacked = jnp.stack([x, x[::-1]])
  vmapped = jax.jit(jax.vmap(lambda xs: model.apply(variables, xs, t, y)))(stacked)
  np.testing.assert_allclose(vmapped[0], out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(vmapped[1], forward(variables, x[::-1], t, y), rtol=1e-5, atol=1e-5)

  def feature_energy(images):
    return jnp.sum(jnp.mean(tokens_after(variables, images, 1), axis=1) ** 2)

  grad = jax.jit(jax.grad(feature_energy))(x)
  assert grad.shape == x.shape and bool(jnp.all(jnp.isfinite(grad))) and float(jnp.max(jnp.abs(grad))) > 0

  for bad in (0, 3, 2.0):
    with pytest.raises(ValueError, match=f"num_blocks={bad!r}: expected an int in 1..2"):
      model.apply(variables, x, t, y, num_blocks=bad, method=dit.DiT.tokens_after)
  with pytest.raises(ValueError, match=r"x of shape \(6, 8, 8, 3\): expected \(B, 8, 8, 4\)"):
    model.apply(variables, x[..., :3], t, y)

  # The tiny named size without a learned sigma: C output channels (shapes only, nothing compiled).
  tiny = dit.dit_spec("T/2", input_size=8, in_channels=3, num_classes=5, learn_sigma=False)
  assert tiny == dict(input_size=8, patch_size=2, in_channels=3, depth=4, hidden_size=64, num_heads=4,
                      mlp_ratio=4.0, num_classes=5, learn_sigma=False)
  tiny_model = dit.create_dit(tiny)
  shapes = jax.eval_shape(tiny_model.apply, dit.abstract_variables(tiny_model), jnp.zeros((2, 8, 8, 3)),
                          jnp.zeros((2,)), jnp.zeros((2,), jnp.int32))
  assert shapes.shape == (2, 8, 8, 3)


def test_attention_and_its_gradient_match_plain_softmax_attention():
  # The heads-major layout with the normalization after the value product is an implementation choice;
  # it must give plain softmax attention's values (also with logits of order 1e4, where an unshifted exp
  # overflows) and gradients (at logits of order 100).
  attention = dit.SelfAttention(HIDDEN, HEADS)
  x = 3.0 * jax.random.normal(jax.random.key(0), (2, 16, HIDDEN))
  base = attention.init(jax.random.key(1), x)["params"]
  base = jax.tree_util.tree_map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), base)

  def reference(params, x):
    qkv = (x @ params["qkv"]["kernel"] + params["qkv"]["bias"]).reshape(2, 16, 3, HEADS, HEAD_DIM)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HEAD_DIM), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, 16, HIDDEN)
    return out @ params["proj"]["kernel"] + params["proj"]["bias"]

  def ours(params, x):
    return attention.apply({"params": params}, x)

  def scaled(multiplier):
    return {**base, "qkv": {**base["qkv"], "kernel": base["qkv"]["kernel"] * multiplier}}

  for multiplier in (1.0, 40.0):
    out, ref = ours(scaled(multiplier), x), reference(scaled(multiplier), x)
    assert np.all(np.isfinite(np.asarray(out))) and float(jnp.max(jnp.abs(ref))) > 0.1
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(ref))))
  loss = lambda fn: lambda params, x: jnp.sum(jnp.sin(fn(params, x)))
  grads, ref_grads = (jax.grad(loss(fn), argnums=(0, 1))(scaled(3.0), x) for fn in (ours, reference))
  for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
    scale = float(jnp.max(jnp.abs(want)))
    assert scale > 1.0
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * scale)


def test_batch_sharded_over_devices_matches_single_device():
  devices = jax.devices()
  assert len(devices) == 8
  spec = _diffusers_spec()
  variables = dit_import.state_dict_to_variables(_numpy_state_dict(_reference()), spec)
  model = dit.create_dit(spec)
  x = _inputs(batch=8, seed=2)
  t = np.linspace(0, 999, 8).astype(np.float32)
  y = np.arange(8, dtype=np.int32) % (NUM_CLASSES + 1)
  mesh = mesh_lib.make_mesh(8)
  batch_sharding = mesh_lib.data_sharding(mesh)
  forward = jax.jit(model.apply, out_shardings=batch_sharding)
  sharded = forward(variables, jax.device_put(x, batch_sharding), jax.device_put(t, batch_sharding),
                    jax.device_put(y, batch_sharding))
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(jax.jit(model.apply)(variables, x, t, y)),
                             rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_output():
  spec = _diffusers_spec()
  variables = dit_import.state_dict_to_variables(_numpy_state_dict(_reference()), spec)
  x, t, y = jnp.asarray(_inputs()), jnp.asarray(TIMESTEPS), jnp.asarray(LABELS, jnp.int32)
  full = jax.jit(dit.create_dit(spec).apply)(variables, x, t, y)
  half_model = dit.create_dit(spec, dtype=jnp.bfloat16)
  half = jax.jit(half_model.apply)(variables, x, t, y)
  assert half.dtype == jnp.float32
  scale = float(jnp.max(jnp.abs(full)))
  err = float(jnp.max(jnp.abs(half - full)))
  assert 0 < err < 0.05 * scale, (err, scale)  # bf16 rounding, but the same function
  # Every matrix product takes bf16 operands and accumulates into float32 (on XLA:CPU a bf16 -> bf16
  # product is also the slow one).
  hlo = jax.jit(half_model.apply).lower(variables, x, t, y).as_text()
  dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
  # timestep MLP (2); per block adaLN, qkv, the two attention products, proj, fc1, fc2 (7); head (2)
  assert len(dots) == 2 + 7 * DEPTH + 2
  for line in dots:
    assert re.search(r"\(tensor<[^>]*xbf16>, tensor<[^>]*xbf16>\) -> tensor<[^>]*xf32>", line), line
  abstract = dit.abstract_variables(half_model)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(abstract)} == {jnp.dtype(jnp.float32)}


def test_official_initialization():
  model = dit.create_dit({**dit.dit_spec("T/2", input_size=8, in_channels=4, num_classes=10), "depth": 2})
  params = dit.init_dit(model, jax.random.key(3))["params"]
  x = jnp.asarray(_inputs(batch=2))
  # adaLN-Zero: the zero final layer gives a zero output.
  out = jax.jit(model.apply)({"params": params}, x, jnp.array([5, 900]), jnp.array([1, 10]))
  assert out.shape == (2, 8, 8, 8) and float(jnp.max(jnp.abs(out))) == 0.0
  for name in ("blocks_0/adaLN_modulation", "blocks_1/adaLN_modulation", "final_layer/adaLN_modulation",
               "final_layer/linear"):
    node = functools.reduce(lambda tree, part: tree[part], name.split("/"), params)
    assert float(jnp.max(jnp.abs(node["kernel"]))) == 0.0, name
    assert float(jnp.max(jnp.abs(node["bias"]))) == 0.0, name
  assert abs(float(jnp.std(params["y_embedder"]["embedding"])) - 0.02) < 0.003
  assert abs(float(jnp.std(params["t_embedder"]["fc1"]["kernel"])) - 0.02) < 0.002
  qkv = params["blocks_0"]["attn"]["qkv"]["kernel"]  # xavier-uniform bound sqrt(6 / (64 + 192))
  bound = (6 / (64 + 192)) ** 0.5
  assert float(jnp.max(jnp.abs(qkv))) <= bound and float(jnp.max(jnp.abs(qkv))) > 0.9 * bound
  patch = params["x_embedder"]["kernel"]  # like a linear of the flattened 2*2*4 patch: sqrt(6 / (16 + 64))
  assert 0.9 * (6 / 80) ** 0.5 < float(jnp.max(jnp.abs(patch))) <= (6 / 80) ** 0.5
  assert float(jnp.max(jnp.abs(params["blocks_0"]["mlp"]["fc1"]["bias"]))) == 0.0


def test_dit_spec_names_and_bad_specs():
  assert dit.dit_spec("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000)["depth"] == 28
  s4 = dit.dit_spec("S/4", input_size=16, in_channels=3, num_classes=10)
  assert (s4["hidden_size"], s4["num_heads"], s4["patch_size"]) == (384, 6, 4)
  assert dit.dit_spec("B/8", input_size=32, in_channels=4, num_classes=1)["num_heads"] == 12
  assert dit.dit_spec("L/2", input_size=32, in_channels=4, num_classes=1)["hidden_size"] == 1024
  for name in ("XXL/2", "XL", "XL/0", "xl/2"):
    with pytest.raises(ValueError, match="name="):
      dit.dit_spec(name, input_size=32, in_channels=4, num_classes=10)
  with pytest.raises(ValueError, match="input_size=30 is not divisible by patch_size=4"):
    dit.dit_spec("B/4", input_size=30, in_channels=4, num_classes=10)
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['dropout'\]"):
    dit.create_dit({**s4, "dropout": 0.1})
  with pytest.raises(ValueError, match="hidden_size=100 is not divisible by num_heads=6"):
    dit.create_dit({**s4, "hidden_size": 100})
  with pytest.raises(ValueError, match=r"lacks field\(s\) \['depth'\]"):
    dit.create_dit({k: v for k, v in s4.items() if k != "depth"})


def test_strict_conversion_names_the_key():
  spec = _diffusers_spec()
  good = _numpy_state_dict(_reference())
  missing = {k: v for k, v in good.items() if k != "transformer_blocks.1.attn1.to_k.weight"}
  with pytest.raises(ValueError, match=r"missing key 'transformer_blocks.1.attn1.to_k.weight' \(expected shape "
                                       r"\(64, 64\)\)"):
    dit_import.state_dict_to_variables(missing, spec)
  extra = dict(good, **{"transformer_blocks.0.norm3.weight": np.ones(64, np.float32)})
  with pytest.raises(ValueError,
                     match=r"unexpected state_dict key 'transformer_blocks.0.norm3.weight' \(shape \(64,\)\)"):
    dit_import.state_dict_to_variables(extra, spec)
  wrong = dict(good, **{"proj_out_2.weight": good["proj_out_2.weight"][:16]})
  with pytest.raises(ValueError, match=r"'proj_out_2.weight' has shape \(16, 64\), .* expects \(32, 64\)"):
    dit_import.state_dict_to_variables(wrong, spec)
  table = "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"
  untied = dict(good, **{table: good[table] + 1.0})
  with pytest.raises(ValueError, match=f"'{table}' differs from block 0's copy"):
    dit_import.state_dict_to_variables(untied, spec)
  with pytest.raises(ValueError, match="not a DiT state_dict"):
    dit_import.detect_layout({"conv1.weight": np.zeros((1,))})
  with pytest.raises(ValueError, match="num_heads cannot be inferred for hidden_size=96"):
    dit_import.infer_dit_spec({**good, "pos_embed.proj.weight": np.zeros((96, 4, 2, 2), np.float32)},
                              input_size=SIZE)


def _save_diffusers_dir(tmp_path) -> str:
  transformer_dir = str(tmp_path / "transformer")
  _reference().save_pretrained(transformer_dir, safe_serialization=True)
  assert os.path.isfile(os.path.join(transformer_dir, import_dit.SAFETENSORS_FILE))
  return transformer_dir


def test_cli_safetensors_end_to_end(tmp_path, capsys):
  transformer_dir = _save_diffusers_dir(tmp_path)
  out_dir = str(tmp_path / "dit")
  assert import_dit.main(["--safetensors", transformer_dir, "--out", out_dir,
                          "--timestep-embedding", "diffusers"]) == 0
  assert "wrote DiT (depth 2, width 64, patch 2, 10 classes)" in capsys.readouterr().out
  model, variables, meta = dit_import.load_dit(out_dir)
  assert meta["class_names"] == [str(i) for i in range(NUM_CLASSES)]
  assert meta["spec"] == _diffusers_spec(timestep_freq_shift=1) and meta["source"]["layout"] == "diffusers"
  x = _inputs(seed=3)
  ours = np.asarray(model.apply(variables, jnp.asarray(x), jnp.asarray(TIMESTEPS),
                                jnp.asarray(LABELS, jnp.int32)))
  err = _assert_close(ours, _torch_forward(_reference(), x, TIMESTEPS, LABELS), "CLI-imported model output")
  assert err < 1e-4

  names = tmp_path / "names.txt"
  names.write_text("\n".join(f"class_{i}" for i in range(NUM_CLASSES)))
  safetensors_file = os.path.join(transformer_dir, import_dit.SAFETENSORS_FILE)
  assert import_dit.main(["--safetensors", safetensors_file, "--out", str(tmp_path / "named"),
                          "--class-names", str(names)]) == 0
  _, _, named_meta = dit_import.load_dit(str(tmp_path / "named"))
  assert named_meta["class_names"][9] == "class_9" and named_meta["spec"]["timestep_freq_shift"] == 0
  names.write_text("a\nb\n")
  capsys.readouterr()
  assert import_dit.main(["--safetensors", safetensors_file, "--out", str(tmp_path / "bad"),
                          "--class-names", str(names)]) == 1
  assert capsys.readouterr().err.strip() == (f"import_dit: {safetensors_file}: --class-names lists 2 classes, "
                                             f"the model has {NUM_CLASSES}")
  assert not diffusion_store.is_complete(str(tmp_path / "bad"))


def test_cli_pth_official_layout(tmp_path):
  reference = _reference()
  torch_sd = {k: v.detach().clone() for k, v in reference.state_dict().items()}
  official = _official_state_dict(torch_sd, DEPTH, HIDDEN, SIZE // PATCH)
  pth = str(tmp_path / "DiT-T-2-8x8.pt")
  torch.save(official, pth)
  out_dir = str(tmp_path / "dit")
  assert import_dit.main(["--pth", pth, "--out", out_dir, "--num-heads", str(HEADS)]) == 0
  model, variables, meta = dit_import.load_dit(out_dir)
  assert meta["spec"] == _diffusers_spec() and meta["source"]["layout"] == "official"
  expected = dit_import.state_dict_to_variables(_numpy_state_dict(reference), meta["spec"], "diffusers")
  for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(variables)[0],
                               jax.tree_util.tree_flatten_with_path(expected)[0]):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_cli_bad_files(tmp_path, capsys):
  reference = _reference()
  good = str(tmp_path / "good.pt")
  torch.save({k: v.detach() for k, v in reference.state_dict().items()}, good)
  data = open(good, "rb").read()
  truncated = str(tmp_path / "truncated.pt")
  with open(truncated, "wb") as f:
    f.write(data[:len(data) // 2])
  random_bytes = str(tmp_path / "random.pt")
  with open(random_bytes, "wb") as f:
    f.write(np.random.default_rng(0).bytes(4096))
  wrong_layout = str(tmp_path / "resnet.pt")
  torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, wrong_layout)
  bad_safetensors = str(tmp_path / "model.safetensors")
  with open(bad_safetensors, "wb") as f:
    f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
  extra_key = str(tmp_path / "extra.pt")
  torch.save({**{k: v.detach() for k, v in reference.state_dict().items()}, "extra.weight": torch.zeros(2)},
             extra_key)

  not_archive = "cannot read a torch state_dict: not a torch zip archive (truncated, or another format)"
  cases = [(["--pth", truncated], not_archive),
           (["--pth", random_bytes], not_archive),
           (["--pth", wrong_layout], "not a DiT state_dict: expected key 'x_embedder.proj.weight'"),
           (["--pth", str(tmp_path / "absent.pt")], "no such file"),
           (["--safetensors", bad_safetensors], "cannot read a safetensors file"),
           (["--pth", extra_key, "--input-size", str(SIZE), "--num-heads", "2"],
            "unexpected state_dict key 'extra.weight' (shape (2,))")]
  for args, reason in cases:
    out_dir = str(tmp_path / "out")
    assert import_dit.main(args + ["--out", out_dir]) == 1, args
    err = capsys.readouterr().err
    assert err.startswith(f"import_dit: {args[1]}: ") and reason in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not diffusion_store.is_complete(out_dir)


def test_cli_process_exit_status_on_a_random_file(tmp_path):
  random_bytes = str(tmp_path / "DiT-XL-2-256x256.pt")
  with open(random_bytes, "wb") as f:
    f.write(np.random.default_rng(1).bytes(1000))
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "prism_jax.tools.import_dit", "--pth", random_bytes, "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
  assert result.returncode == 1
  assert result.stderr == (f"import_dit: {random_bytes}: cannot read a torch state_dict: not a torch zip "
                           "archive (truncated, or another format)\n")


def test_load_dit_refuses_variables_of_another_size(tmp_path):
  small = dit.dit_spec("T/2", input_size=8, in_channels=4, num_classes=10)
  variables = jax.tree_util.tree_map(lambda leaf: np.full(leaf.shape, 0.5, np.float32),
                                     dit.abstract_variables(dit.create_dit(small)))
  model_dir = str(tmp_path / "dit")
  diffusion_store.save_model(model_dir, kind="dit", variables=variables, spec={**small, "hidden_size": 128},
                             class_names=[str(i) for i in range(10)])
  with pytest.raises(artifacts.ArtifactError,
                     match=rf"{model_dir}: key 'params/blocks_0/adaLN_modulation/bias' has shape \(384,\), "
                           r"the model of the spec expects \(768,\)"):
    dit_import.load_dit(model_dir)
  deeper_dir = str(tmp_path / "deeper")
  diffusion_store.save_model(deeper_dir, kind="dit", variables=variables, spec={**small, "depth": 5})
  with pytest.raises(artifacts.ArtifactError, match=rf"{deeper_dir}: missing key 'params/blocks_4/"):
    dit_import.load_dit(deeper_dir)
  bad_spec_dir = str(tmp_path / "bad_spec")
  diffusion_store.save_model(bad_spec_dir, kind="dit", variables=variables, spec={**small, "patch_size": 3})
  with pytest.raises(artifacts.ArtifactError, match="input_size=8 is not divisible by patch_size=3"):
    dit_import.load_dit(bad_spec_dir)
  good_dir = str(tmp_path / "good")
  diffusion_store.save_model(good_dir, kind="dit", variables=variables, spec=small)
  model, loaded, meta = dit_import.load_dit(good_dir)
  assert model.depth == 4 and meta["spec"] == small
  np.testing.assert_array_equal(loaded["params"]["y_embedder"]["embedding"],
                                variables["params"]["y_embedder"]["embedding"])
