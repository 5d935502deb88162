"""AutoencoderKL port: parity with diffusers (random weights, fp32), the SD key map on torch's meta
device, latent scaling and sampling, strict conversion errors, and the import CLI end to end.

diffusers and torch are test-only dependencies; nothing downloads. Runs in ~30 s on 2 CPU cores.
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from prism_jax.diffusion import vae, vae_import
from prism_jax.io import diffusion_store
from prism_jax.tools import import_vae
from tests import cli_utils

torch.set_num_threads(1)

TINY = vae.vae_spec("tiny")  # widths (32, 64), 1 layer per block, 8 groups: 2x down
IMAGE_SHAPE = (2, 16, 24, 3)  # not square, so an H/W mix-up in the port shows
CLIPPED_HIGH, CLIPPED_LOW = 0, 1  # logvar channels pushed past the [-30, 20] clip
SD_PARAM_COUNT = 83_653_863  # diffusers AutoencoderKL with the SD config


def _reference_kwargs(spec):
  blocks = len(spec["block_out_channels"])
  return dict(in_channels=spec["in_channels"], out_channels=spec["out_channels"],
              down_block_types=("DownEncoderBlock2D",) * blocks,
              up_block_types=("UpDecoderBlock2D",) * blocks,
              block_out_channels=tuple(spec["block_out_channels"]),
              layers_per_block=spec["layers_per_block"], latent_channels=spec["latent_channels"],
              norm_num_groups=spec["norm_num_groups"], scaling_factor=spec["scaling_factor"])


@functools.lru_cache(maxsize=1)
def _reference_model():
  """The tiny diffusers VAE with random GroupNorm affines and two log-variance channels out of range."""
  torch.manual_seed(0)
  model = DiffusersAutoencoderKL(**_reference_kwargs(TINY))
  gen = torch.Generator().manual_seed(1)
  latent = TINY["latent_channels"]
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.GroupNorm):
        module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
        module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=gen))
    model.quant_conv.bias[latent + CLIPPED_HIGH] += 60.0
    model.quant_conv.bias[latent + CLIPPED_LOW] -= 60.0
  return model.eval()


def _reference_state_dict():
  return {k: v.detach().numpy().copy() for k, v in _reference_model().state_dict().items()}


@functools.lru_cache(maxsize=1)
def _converted():
  variables = vae_import.state_dict_to_variables(_reference_state_dict(), TINY)
  return vae.create_vae(TINY), variables


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _assert_close(actual, expected, what):
  expected = np.asarray(expected, np.float64)
  scale = max(1.0, float(np.max(np.abs(expected))))
  err = float(np.max(np.abs(np.asarray(actual, np.float64) - expected)))
  assert err <= 1e-4 * scale, f"{what}: max abs diff {err:.3g} > {1e-4 * scale:.3g} (scale {scale:.3g})"
  return err / scale


def _images(shape=IMAGE_SHAPE, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _jitted(method):
  return jax.jit(lambda model, variables, x: model.apply(variables, x, method=method), static_argnums=0)


@pytest.mark.usefixtures("optimized_xla")  # parity as users run it
def test_encoder_decoder_match_diffusers():
  reference = _reference_model()
  model, variables = _converted()
  images = _images()
  latents = np.random.default_rng(1).normal(size=(2, 8, 12, TINY["latent_channels"])).astype(np.float32)
  with torch.no_grad():
    posterior = reference.encode(_nchw(images)).latent_dist
    ref_mean, ref_logvar = _nhwc(posterior.mean), _nhwc(posterior.logvar)
    ref_decoded = _nhwc(reference.decode(_nchw(latents)).sample)
    ref_roundtrip = _nhwc(reference(_nchw(images)).sample)  # decode(posterior mode)

  mean, logvar = _jitted(vae.AutoencoderKL.encode)(model, variables, images)
  decoded = _jitted(vae.AutoencoderKL.decode)(model, variables, latents)
  roundtrip = _jitted(vae.AutoencoderKL.__call__)(model, variables, images)

  assert mean.shape == logvar.shape == (2, 8, 12, 4) and decoded.shape == (2, 16, 24, 3)
  _assert_close(mean, ref_mean, "posterior mean")
  # The pushed channels sit exactly on the clip bounds; the others are compared at their own scale.
  np.testing.assert_array_equal(ref_logvar[..., CLIPPED_HIGH], 20.0)
  np.testing.assert_array_equal(np.asarray(logvar[..., CLIPPED_HIGH]), 20.0)
  np.testing.assert_array_equal(np.asarray(logvar[..., CLIPPED_LOW]), -30.0)
  _assert_close(logvar[..., 2:], ref_logvar[..., 2:], "posterior logvar")
  _assert_close(decoded, ref_decoded, "decoder output")
  _assert_close(roundtrip, ref_roundtrip, "decode(encode mean)")
  assert float(np.std(ref_decoded)) > 0.1  # the outputs compared are not near zero


def test_bfloat16_compute_stays_close_to_float32():
  model, variables = _converted()
  latents = np.random.default_rng(2).normal(size=(1, 4, 4, 4)).astype(np.float32)
  fp32 = _jitted(vae.AutoencoderKL.decode)(model, variables, latents)
  bf16 = _jitted(vae.AutoencoderKL.decode)(vae.create_vae(TINY, dtype=jnp.bfloat16), variables, latents)
  assert bf16.dtype == jnp.bfloat16
  rel = float(jnp.max(jnp.abs(bf16.astype(jnp.float32) - fp32)) / jnp.max(jnp.abs(fp32)))
  assert rel < 5e-2, rel


def test_sd_key_map_and_param_count_match_diffusers_on_meta_device():
  spec = vae.vae_spec("sd")
  with torch.device("meta"):  # shapes only: the 84M-parameter model is never allocated
    reference = DiffusersAutoencoderKL(**_reference_kwargs(spec))
  ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  ours = vae_import.expected_state_dict_shapes(spec)
  assert sorted(set(ref_shapes) - set(ours)) == [] and sorted(set(ours) - set(ref_shapes)) == []
  assert {k: s for k, s in ours.items() if ref_shapes[k] != s} == {}
  assert len(ours) == 248

  model = vae.create_vae(spec)
  abstract = vae_import.abstract_variables(model)
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(abstract))
  assert count == sum(p.numel() for p in reference.parameters()) == SD_PARAM_COUNT

  mean, logvar = jax.eval_shape(lambda v, x: model.apply(v, x, method=vae.AutoencoderKL.encode),
                                abstract, jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
  assert mean.shape == logvar.shape == (1, 32, 32, 4)  # 8x down, 4 latent channels

  # The whole conversion on zero-stride arrays (no memory): every key lands, shapes check out.
  zeros = {k: np.broadcast_to(np.float32(0), s) for k, s in ref_shapes.items()}
  assert vae_import.infer_vae_spec(zeros) == spec
  vae_import.check_variables_match(model, vae_import.state_dict_to_variables(zeros, spec))


def test_encode_to_latents_scaling_and_sampling():
  model, variables = _converted()  # same shapes as the parity test: its compiled encode/decode are reused
  images = _images(seed=3)
  mean, logvar = _jitted(vae.AutoencoderKL.encode)(model, variables, images)

  encode = jax.jit(functools.partial(vae.encode_to_latents, model))
  latents = encode(variables, images)
  np.testing.assert_allclose(latents, mean * 0.18215, rtol=1e-5, atol=1e-6)  # separately compiled programs
  decoded = jax.jit(functools.partial(vae.decode_latents, model))(variables, latents)
  np.testing.assert_allclose(decoded, _jitted(vae.AutoencoderKL.decode)(model, variables, mean),
                             rtol=1e-5, atol=1e-5)

  sample = encode(variables, images, jax.random.key(7))
  np.testing.assert_array_equal(sample, encode(variables, images, jax.random.key(7)))
  assert float(jnp.max(jnp.abs(sample - encode(variables, images, jax.random.key(8))))) > 1e-3
  # sample / scale = mean + std * eps with eps ~ N(0, 1) drawn from the key (std = e^-15 on the channel
  # clipped low, too small to recover eps from).
  eps = (sample / 0.18215 - mean) / jnp.exp(0.5 * logvar)
  want = jax.random.normal(jax.random.key(7), mean.shape)
  kept = [c for c in range(TINY["latent_channels"]) if c != CLIPPED_LOW]
  np.testing.assert_allclose(eps[..., kept], want[..., kept], rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(sample[..., CLIPPED_LOW], latents[..., CLIPPED_LOW], rtol=1e-5, atol=1e-6)


def test_bad_resolution_is_refused():
  model, variables = _converted()
  with pytest.raises(ValueError, match=r"images of shape \(1, 9, 16, 3\).*divisible by 2"):
    model.apply(variables, np.zeros((1, 9, 16, 3), np.float32), method=vae.AutoencoderKL.encode)


def test_conversion_names_missing_extra_and_misshaped_keys():
  state_dict = _reference_state_dict()
  assert vae_import.infer_vae_spec(state_dict, norm_num_groups=8) == TINY

  missing = dict(state_dict)
  del missing["encoder.mid_block.attentions.0.to_q.weight"]
  with pytest.raises(ValueError, match=r"missing key 'encoder\.mid_block\.attentions\.0\.to_q\.weight' "
                                       r"\(expected shape \(64, 64\)\)"):
    vae_import.state_dict_to_variables(missing, TINY)

  extra = dict(state_dict, **{"decoder.extra.weight": np.zeros((3, 3), np.float32)})
  with pytest.raises(ValueError,
                     match=r"unexpected state_dict key 'decoder\.extra\.weight' \(shape \(3, 3\)\)"):
    vae_import.state_dict_to_variables(extra, TINY)

  misshaped = dict(state_dict, **{"decoder.conv_out.weight": np.zeros((3, 32, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"'decoder\.conv_out\.weight' has shape \(3, 32, 1, 1\), .* expects "
                                       r"\(3, 32, 3, 3\)"):
    vae_import.state_dict_to_variables(misshaped, TINY)

  with pytest.raises(ValueError, match=r"'encoder\.conv_in\.weight' has shape \(32, 3, 3, 3\), .* expects "
                                       r"\(64, 3, 3, 3\)"):
    vae_import.state_dict_to_variables(state_dict, dict(TINY, block_out_channels=(64, 64)))


def test_legacy_attention_names_and_1x1_conv_weights():
  state_dict = _reference_state_dict()
  legacy = {}
  for key, value in state_dict.items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
      if ".attentions.0." in key and f".{new}." in key:
        key = key.replace(f".{new}.", f".{old}.")
        if key.endswith("weight"):  # the original LDM stored these as 1x1 convs
          value = value[:, :, None, None] if old != "proj_attn" else value[:, :, None]
    legacy[key] = value
  assert "decoder.mid_block.attentions.0.query.weight" in legacy
  assert legacy["encoder.mid_block.attentions.0.key.weight"].shape == (64, 64, 1, 1)
  got = vae_import.state_dict_to_variables(legacy, TINY)
  want = _converted()[1]
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)

  both = dict(legacy, **{"encoder.mid_block.attentions.0.to_q.bias": state_dict[
      "encoder.mid_block.attentions.0.to_q.bias"]})
  with pytest.raises(ValueError, match=r"both 'encoder\.mid_block\.attentions\.0\.query\.bias' and "
                                       r"'encoder\.mid_block\.attentions\.0\.to_q\.bias'"):
    vae_import.state_dict_to_variables(both, TINY)

  ldm = {"encoder.down.0.block.0.norm1.weight": np.zeros(32, np.float32)}
  with pytest.raises(ValueError, match=r"'encoder\.down\.0\.block\.0\.norm1\.weight' is in the original "
                                       r"CompVis/LDM layout"):
    vae_import.infer_vae_spec(ldm)


@pytest.fixture(scope="module")
def saved_reference(tmp_path_factory):
  """The reference saved by diffusers (config.json with a non-default scaling factor), both formats."""
  root = tmp_path_factory.mktemp("diffusers_vae")
  reference = _reference_model()
  reference.register_to_config(scaling_factor=0.13025)
  try:
    reference.save_pretrained(str(root / "safetensors" / "vae"))
    reference.save_pretrained(str(root / "bin"), safe_serialization=False)
  finally:
    reference.register_to_config(scaling_factor=TINY["scaling_factor"])
  return root


def test_cli_imports_diffusers_directory_end_to_end(saved_reference, tmp_path, capsys):
  out = str(tmp_path / "vae")
  assert import_vae.main(["--weights", str(saved_reference / "safetensors"), "--out", out]) == 0
  assert "wrote VAE (widths 32x64" in capsys.readouterr().out
  model, variables, meta = vae_import.load_vae(out)
  assert meta["kind"] == "vae" and meta["spec"]["scaling_factor"] == 0.13025
  assert meta["spec"]["norm_num_groups"] == 8 and model.block_out_channels == (32, 64)
  assert meta["source"]["weights"].endswith("vae/diffusion_pytorch_model.safetensors")

  latents = np.random.default_rng(4).normal(size=(1, 4, 6, 4)).astype(np.float32)
  with torch.no_grad():
    ref_images = _nhwc(_reference_model().decode(_nchw(latents / 0.13025)).sample)
  _assert_close(vae.decode_latents(model, variables, latents), ref_images, "decoder output after import")

  bin_out = str(tmp_path / "vae_bin")
  assert import_vae.main(["--weights", str(saved_reference / "bin" / "diffusion_pytorch_model.bin"),
                          "--out", bin_out]) == 0
  bin_variables = vae_import.load_vae(bin_out)[1]
  jax.tree_util.tree_map(np.testing.assert_array_equal, bin_variables, variables)

  # A bfloat16 safetensors file (numpy has no bfloat16 of its own) imports as its float32 values.
  from safetensors.torch import save_file
  bf16_file = tmp_path / "bf16" / "diffusion_pytorch_model.safetensors"
  bf16_file.parent.mkdir()
  save_file({k: v.bfloat16() for k, v in _reference_model().state_dict().items()}, str(bf16_file))
  assert import_vae.main(["--weights", str(bf16_file), "--out", str(tmp_path / "vae_bf16"),
                          "--norm-num-groups", "8"]) == 0
  rounded = {k: v.bfloat16().float().numpy() for k, v in _reference_model().state_dict().items()}
  jax.tree_util.tree_map(np.testing.assert_array_equal, vae_import.load_vae(str(tmp_path / "vae_bf16"))[1],
                         vae_import.state_dict_to_variables(rounded, TINY))


def test_cli_refuses_bad_files_with_one_line(saved_reference, tmp_path, capsys):
  source = saved_reference / "safetensors" / "vae" / "diffusion_pytorch_model.safetensors"
  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes(source.read_bytes()[: os.path.getsize(source) // 2])
  assert import_vae.main(["--weights", str(truncated), "--out", str(tmp_path / "a")]) == 1
  err = capsys.readouterr().err
  assert err.startswith(f"import_vae: {truncated}: not a readable safetensors file")
  assert err.count("\n") == 1
  assert not diffusion_store.is_complete(str(tmp_path / "a"))

  directory = tmp_path / "mismatch"
  directory.mkdir()
  (directory / "diffusion_pytorch_model.safetensors").write_bytes(source.read_bytes())
  config = (source.parent / "config.json").read_text()
  config = config.replace('"layers_per_block": 1', '"layers_per_block": 2')
  (directory / "config.json").write_text(config)
  assert import_vae.main(["--weights", str(directory), "--out", str(tmp_path / "b")]) == 1
  assert capsys.readouterr().err == (f"import_vae: {directory / 'config.json'}: layers_per_block=2 but the "
                                     "weights have layers_per_block=1\n")

  random_bytes = tmp_path / "random.safetensors"
  random_bytes.write_bytes(np.random.default_rng(5).bytes(4096))
  command = [sys.executable, "-m", "prism_jax.tools.import_vae", "--weights", str(random_bytes),
             "--out", str(tmp_path / "c")]
  result = subprocess.run(command, cwd=cli_utils.REPO_ROOT, env=cli_utils.cli_env(1),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 1, result.stderr
  assert result.stderr.startswith(f"import_vae: {random_bytes}: not a readable safetensors file")
  assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_load_vae_names_first_mismatching_variable(tmp_path):
  _, variables = _converted()
  model_dir = str(tmp_path / "wrong_spec")
  diffusion_store.save_model(model_dir, kind="vae", variables=variables, spec=dict(TINY, latent_channels=8))
  with pytest.raises(ValueError, match=r"key 'params/decoder/conv_in/kernel' has shape \(3, 3, 4, 64\), "
                                       r"the model expects \(3, 3, 8, 64\)"):
    vae_import.load_vae(model_dir)
