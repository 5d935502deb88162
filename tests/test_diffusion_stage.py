"""The diffusion stage: a tiny DiT trained in-process and through the CLI (loss, artifacts, rerun,
1 vs 8 devices, resume after kill), a few steps in the latent space of a tiny random VAE (cached
latents, decoded samples, rerun), and the bad-input messages of both spaces and of import mode."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from cli_utils import REPO_ROOT, cli_command, cli_env
from configs import quickstart_diffusion
from prism_jax import config_checks
from prism_jax.diffusion import dit_import, vae, vae_import
from prism_jax.diffusion import latents as latents_lib
from prism_jax.io import artifacts, diffusion_store
from prism_jax.parallel import mesh as mesh_lib
from prism_jax.stages import diffusion as diffusion_stage


# A tiny run on 8 px two-class data: DiT-T/2 (16 tokens), 20 steps of batch 16. In-process runs
# checkpoint only at the end (saves cost seconds here); the killed CLI run every 10 steps.
TINY = {"diffusion.steps": 20, "diffusion.batch_size": 16, "diffusion.learning_rate": 2e-3,
        "diffusion.ema_decay": 0.9, "diffusion.log_every_steps": 10, "diffusion.checkpoint_every_steps": 20,
        "diffusion.sample_steps": 4, "diffusion.samples_per_class": 2, "progress_interval_s": 0.0}


def _write_data(path, class_names=("dark", "bright")):
  """Two easy classes: dark images with a faint pattern, bright squares."""
  rng = np.random.default_rng(0)
  os.makedirs(path, exist_ok=True)
  for split, n in (("train", 32), ("test", 8)):
    labels = np.arange(n) % 2
    images = np.where(labels[:, None, None, None] == 1, 220, 30) + rng.integers(0, 20, (n, 8, 8, 3))
    images[labels == 1, :2] = 0
    np.savez(os.path.join(path, f"{split}.npz"), images=images.astype(np.uint8), labels=labels,
             class_names=np.array(class_names))
  return str(path)


def _config(data_dir, **overrides):
  config = quickstart_diffusion.get_config()
  config.data.source, config.data.path, config.data.name, config.data.image_size = "arrays", data_dir, "toy", 0
  for dotted, value in {**TINY, **overrides}.items():
    node = config
    *parents, leaf = dotted.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  config_checks.validate(config)
  return config


def _cli_flags(data_dir):
  flags = ["--config.data.source=arrays", f"--config.data.path={data_dir}", "--config.data.name=toy",
           "--config.data.image_size=0"]
  return flags + [f"--config.{k}={v}" for k, v in {**TINY, "diffusion.checkpoint_every_steps": 10}.items()]


def _params(model_dir):
  variables, _ = diffusion_store.load_variables(model_dir, kind="dit")
  return variables


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return _write_data(tmp_path_factory.mktemp("toy_data"))


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """An in-process run on the 8 devices of the test session."""
  workdir = str(tmp_path_factory.mktemp("diffusion8"))
  result = diffusion_stage.run(_config(data_dir, **{"diffusion.sample_every_steps": 10}), workdir,
                               mesh_lib.make_mesh(8))
  return workdir, result


def test_training_lowers_the_loss_and_writes_the_model(trained, data_dir, capsys):
  workdir, result = trained
  model_dir = diffusion_stage.model_dir(workdir)
  model, variables, meta = dit_import.load_dit(model_dir)
  assert (model.input_size, model.in_channels, model.num_classes) == (8, 3, 2)
  assert meta["class_names"] == ["dark", "bright"]
  history = meta["history"]
  assert [h["step"] for h in history] == [10, 20]
  assert history[-1]["loss"] < 0.6 * history[0]["loss"], history
  assert history[-1]["ema_loss"] < history[0]["ema_loss"], history
  assert result["loss"] == pytest.approx(history[-1]["loss"])
  from PIL import Image
  grid = np.asarray(Image.open(os.path.join(workdir, "diffusion", "samples.png")))
  assert grid.shape == (2 * 8, 2 * 8, 3)
  # TensorBoard: the loss, and sample grids during training (sample_every_steps) and at the end.
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard", "diffusion"))
  acc.Reload()
  assert [e.step for e in acc.Tensors("diffusion/samples")] == [10, 20]
  assert acc.Scalars("eval/loss")
  # The kept weights (config.diffusion.weights='auto': the EMA unless its held-out loss is higher) run.
  assert meta["source"]["weights"] == diffusion_stage.chosen_weights("auto", history[-1])
  assert meta["timing_last_run"]["seconds_total"] >= meta["timing_last_run"]["train_seconds"] > 0
  out = model.apply(variables, np.zeros((2, 8, 8, 3), np.float32), np.array([10, 500]), np.array([0, 2]))
  assert out.shape == (2, 8, 8, 6) and np.isfinite(np.asarray(out)).all()

  # A rerun is a no-op; another recipe is refused naming the field.
  before = os.path.getmtime(os.path.join(model_dir, diffusion_store.META_FILE))
  capsys.readouterr()
  diffusion_stage.run(_config(data_dir), workdir, mesh_lib.make_mesh(8))
  assert "already trained" in capsys.readouterr().out
  assert os.path.getmtime(os.path.join(model_dir, diffusion_store.META_FILE)) == before
  with pytest.raises(artifacts.ArtifactError, match="diffusion.learning_rate"):
    diffusion_stage.run(_config(data_dir, **{"diffusion.learning_rate": 1e-4}), workdir, mesh_lib.make_mesh(8))


def test_weights_setting_chooses_by_held_out_loss_and_resaves_without_training(trained, data_dir, tmp_path, capsys):
  assert diffusion_stage.chosen_weights("auto", {"loss": 0.04, "ema_loss": 0.15}) == "raw"  # a short run's EMA
  assert diffusion_stage.chosen_weights("auto", {"loss": 0.05, "ema_loss": 0.04}) == "ema"
  assert diffusion_stage.chosen_weights("ema", {"loss": 0.04, "ema_loss": 0.15}) == "ema"
  assert diffusion_stage.chosen_weights("raw", {"loss": 0.05, "ema_loss": 0.04}) == "raw"
  workdir = str(tmp_path / "copy")
  shutil.copytree(trained[0], workdir)
  model_dir = diffusion_stage.model_dir(workdir)
  meta = diffusion_store.load_meta(model_dir, kind="dit")
  first, other = meta["source"]["weights"], {"ema": "raw", "raw": "ema"}[meta["source"]["weights"]]
  original = _params(model_dir)
  capsys.readouterr()
  result = diffusion_stage.run(_config(data_dir, **{"diffusion.weights": other}), workdir, mesh_lib.make_mesh(8))
  out = capsys.readouterr().out
  assert "saving them from the final checkpoint" in out and "resuming from step 20/20" in out, out
  assert result["weights"] == other
  swapped = diffusion_store.load_meta(model_dir, kind="dit")
  assert swapped["source"] == {**meta["source"], "weights": other, "ema": other == "ema"}
  assert swapped["timing_last_run"] == meta["timing_last_run"] and swapped["history"] == meta["history"]
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(_params(model_dir)),
                                                       jax.tree_util.tree_leaves(original)))
  # Back to the first choice: the same weights as the first save, bit for bit.
  diffusion_stage.run(_config(data_dir, **{"diffusion.weights": first}), workdir, mesh_lib.make_mesh(8))
  for a, b in zip(jax.tree_util.tree_leaves(_params(model_dir)), jax.tree_util.tree_leaves(original)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match=r"config\.diffusion\.weights='best'"):
    diffusion_stage.run(_config(data_dir, **{"diffusion.weights": "best"}), workdir, mesh_lib.make_mesh(8))


def test_one_and_eight_devices_train_the_same_weights(trained, data_dir, tmp_path):
  workdir8, _ = trained
  workdir1 = str(tmp_path / "one")
  diffusion_stage.run(_config(data_dir), workdir1, mesh_lib.make_mesh(1))
  got, want = _params(diffusion_stage.model_dir(workdir1)), _params(diffusion_stage.model_dir(workdir8))
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-4)
  from PIL import Image
  s1 = np.asarray(Image.open(os.path.join(workdir1, "diffusion", "samples.png")), np.int32)
  s8 = np.asarray(Image.open(os.path.join(workdir8, "diffusion", "samples.png")), np.int32)
  assert np.abs(s1 - s8).max() <= 2


def test_resume_after_kill_matches_uninterrupted_run(trained, data_dir, tmp_path):
  reference_dir, _ = trained
  workdir = str(tmp_path / "killed")
  command = cli_command("configs/quickstart_diffusion.py", workdir, *_cli_flags(data_dir))
  env = cli_env(num_devices=8)
  proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_dir = os.path.join(workdir, "diffusion", "ckpt")
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    # A step counts once its checksum record is written (io/checkpoint.py): a kill before that
    # leaves a step a restore refuses, and the rerun would start over.
    records = os.path.join(ckpt_dir, "checksums")
    steps = [d for d in os.listdir(records) if d.endswith(".json")] if os.path.isdir(records) else []
    if steps:
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not diffusion_store.is_complete(diffusion_stage.model_dir(workdir)), "killed too late"
  resumed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
  assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
  assert "resuming from step" in resumed.stdout
  got, want = _params(diffusion_stage.model_dir(workdir)), _params(diffusion_stage.model_dir(reference_dir))
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_input_is_named(trained, data_dir, tmp_path):
  workdir, _ = trained
  with pytest.raises(ValueError, match=r"config\.diffusion\.model='Q/2'.*T/2"):
    _config(data_dir, **{"diffusion.model": "Q/2"})
  with pytest.raises(ValueError, match=r"config\.diffusion\.steps=0"):
    _config(data_dir, **{"diffusion.steps": 0})
  mesh8 = mesh_lib.make_mesh(8)
  with pytest.raises(ValueError, match=r"config\.diffusion\.batch_size=12 must be divisible by the 8 devices"):
    diffusion_stage.run(_config(data_dir, **{"diffusion.batch_size": 12}), str(tmp_path / "b"), mesh8)
  missing = str(tmp_path / "nope")
  with pytest.raises(ValueError, match=r"config\.diffusion\.import_dir=.*nope.*directory not found"):
    diffusion_stage.run(_config(data_dir, **{"diffusion.model": "", "diffusion.import_dir": missing}),
                        str(tmp_path / "c"), mesh8)

  # An imported DiT whose classes are not the data's: refused unless class_map maps them.
  trained_model = diffusion_stage.model_dir(workdir)
  other_data = _write_data(tmp_path / "other", class_names=("cat", "dog"))
  imported = {"diffusion.model": "", "diffusion.import_dir": trained_model}
  with pytest.raises(ValueError, match=r"config\.diffusion\.import_dir=.*'dark', 'bright'.*class_map"):
    diffusion_stage.run(_config(other_data, **imported), str(tmp_path / "d"), mesh8)
  with pytest.raises(ValueError, match=r"config\.diffusion\.class_map=\(0, 5\): index 5"):
    diffusion_stage.run(_config(other_data, **imported, **{"diffusion.class_map": (0, 5)}), str(tmp_path / "d"), mesh8)
  result = diffusion_stage.run(_config(other_data, **imported, **{"diffusion.class_map": (1, 0)}),
                               str(tmp_path / "d"), mesh8)
  assert result == {"model_dir": trained_model, "class_map": [1, 0]}
  assert diffusion_stage.resolve_model(str(tmp_path / "d")) == (trained_model, (1, 0))
  assert sorted(os.listdir(tmp_path / "d" / "diffusion")) == [diffusion_stage.IMPORT_FILE]
  # Data classes the model has under the same names (an ImageNet subset's synset ids): mapped by name.
  reordered = _write_data(tmp_path / "reordered", class_names=("bright", "dark"))
  result = diffusion_stage.run(_config(reordered, **imported), str(tmp_path / "g"), mesh8)
  assert result == {"model_dir": trained_model, "class_map": [1, 0]}
  # Same classes: accepted without a map. And with nothing configured the stage does nothing.
  assert diffusion_stage.run(_config(data_dir, **imported), str(tmp_path / "e"), mesh8)["class_map"] is None
  assert diffusion_stage.run(_config(data_dir, **{"diffusion.model": ""}), str(tmp_path / "f"), mesh8) == {}
  assert not os.path.exists(tmp_path / "f" / "diffusion")


# ----------------------------------------------------------------------------- latent space

# The tiny VAE (2x down, 4 latent channels, random weights): the 8 px toy images become 4x4x4 latents,
# DiT-T/2 sees 4 tokens. A few steps only: this checks the plumbing, not the learning.
LATENT = {"diffusion.space": "latent", "diffusion.steps": 4, "diffusion.log_every_steps": 2,
          "diffusion.checkpoint_every_steps": 4, "diffusion.sample_steps": 2}


def _write_vae(path, seed):
  spec = vae.vae_spec("tiny")
  variables = jax.jit(vae.create_vae(spec).init)(jax.random.key(seed), np.zeros((1, 8, 8, 3), np.float32))
  diffusion_store.save_model(str(path), kind="vae", variables=variables, spec=spec, source={"test": seed})
  return str(path)


@pytest.fixture(scope="module")
def latent_trained(data_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("latent")
  vae_dir = _write_vae(root / "vae", seed=3)
  workdir = str(root / "work")
  config = _config(data_dir, **LATENT, **{"diffusion.vae_dir": vae_dir})
  result = diffusion_stage.run(config, workdir, mesh_lib.make_mesh(8))
  return workdir, vae_dir, result


def test_latent_space_training_writes_latents_model_and_samples(latent_trained, data_dir, tmp_path, capsys):
  workdir, vae_dir, result = latent_trained
  vae_model, vae_variables, vae_meta = vae_import.load_vae(vae_dir)
  # The cached latents are the encoder mean x scaling factor of every training image.
  with np.load(diffusion_stage.latents_path(workdir)) as z:
    cached = z["latents"]
  assert cached.shape == (32, 4, 4, 4)
  with np.load(os.path.join(data_dir, "train.npz")) as z:
    images = z["images"].astype(np.float32) / 127.5 - 1.0
  direct = jax.jit(lambda v, x: vae.encode_to_latents(vae_model, v, x))(vae_variables, images)
  np.testing.assert_allclose(cached, direct, atol=1e-5)

  model_dir = diffusion_stage.model_dir(workdir)
  model, variables, meta = dit_import.load_dit(model_dir)
  assert (model.input_size, model.in_channels, model.num_classes) == (4, 4, 2)
  assert meta["space"] == "latent"
  assert meta["vae"]["dir"] == vae_dir and meta["vae"]["variables_sha256"] == vae_meta["variables_sha256"]
  assert meta["fingerprint"]["vae"]["variables_sha256"] == vae_meta["variables_sha256"]
  assert meta["fingerprint"]["diffusion"]["space"] == "latent"
  assert [h["step"] for h in meta["history"]] == [2, 4] and np.isfinite(result["loss"])
  assert diffusion_stage.resolve_vae(workdir)["dir"] == vae_dir
  from PIL import Image
  grid = np.asarray(Image.open(os.path.join(workdir, "diffusion", "samples.png")))
  assert grid.shape == (2 * 8, 2 * 8, 3) and grid.dtype == np.uint8

  # A rerun is a no-op (nothing re-encoded or rewritten); another VAE is refused naming its checksum.
  stamps = {p: os.path.getmtime(p) for p in (diffusion_stage.latents_path(workdir),
                                             os.path.join(model_dir, diffusion_store.META_FILE))}
  capsys.readouterr()
  config = _config(data_dir, **LATENT, **{"diffusion.vae_dir": vae_dir})
  diffusion_stage.run(config, workdir, mesh_lib.make_mesh(8))
  assert "already trained" in capsys.readouterr().out
  assert {p: os.path.getmtime(p) for p in stamps} == stamps
  other_vae = str(tmp_path / "other_vae")
  other_vars = jax.tree_util.tree_map(lambda x: x + 1e-3, vae_variables)
  diffusion_store.save_model(other_vae, kind="vae", variables=other_vars, spec=vae_meta["spec"])
  with pytest.raises(artifacts.ArtifactError, match=r"vae\.variables_sha256"):
    diffusion_stage.run(_config(data_dir, **LATENT, **{"diffusion.vae_dir": other_vae}), workdir,
                        mesh_lib.make_mesh(8))


def test_latent_cache_is_reused_or_recomputed(tmp_path, capsys):
  path = str(tmp_path / "latents.npz")
  fingerprint = {"data": {"name": "toy"}, "vae": {"variables_sha256": "a"}}
  first = latents_lib.load_or_encode(path, fingerprint, lambda: np.ones((3, 2, 2, 4)))
  again = latents_lib.load_or_encode(path, fingerprint, lambda: pytest.fail("re-encoded a valid cache"))
  np.testing.assert_array_equal(first, again)
  assert "reusing 3 cached latents" in capsys.readouterr().out
  other = {"data": {"name": "toy"}, "vae": {"variables_sha256": "b"}}
  assert latents_lib.load_or_encode(path, other, lambda: np.zeros((3, 2, 2, 4))).max() == 0
  assert "other vae.variables_sha256; encoding again" in capsys.readouterr().out
  with np.load(path) as z:
    assert z["latents"].max() == 0  # the cache now holds the new latents


def test_latent_bad_input_is_named(latent_trained, data_dir, tmp_path):
  workdir, vae_dir, _ = latent_trained
  mesh8 = mesh_lib.make_mesh(8)
  with pytest.raises(ValueError, match=r"config\.diffusion\.vae_dir is '': config\.diffusion\.space='latent'"):
    diffusion_stage.run(_config(data_dir, **LATENT), str(tmp_path / "a"), mesh8)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"config\.diffusion\.vae_dir=.*empty.*not a VAE directory"):
    diffusion_stage.run(_config(data_dir, **LATENT, **{"diffusion.vae_dir": str(tmp_path / "empty")}),
                        str(tmp_path / "a"), mesh8)
  dit_dir = diffusion_stage.model_dir(workdir)
  with pytest.raises(ValueError, match=r"vae_dir=.*not a VAE directory.*holds a 'dit' model"):
    diffusion_stage.run(_config(data_dir, **LATENT, **{"diffusion.vae_dir": dit_dir}), str(tmp_path / "a"), mesh8)
  with pytest.raises(ValueError, match=r"data image size 7 px is not divisible by the downsampling factor 2 "
                                       r"of the VAE in config\.diffusion\.vae_dir"):
    diffusion_stage.run(_config(data_dir, **LATENT, **{"diffusion.vae_dir": vae_dir, "data.image_size": 7}),
                        str(tmp_path / "a"), mesh8)
  assert not os.path.exists(tmp_path / "a")

  # Import mode: the DiT's input must be what it would see (pixels, or the VAE's latents).
  imported = {"diffusion.model": "", "diffusion.import_dir": dit_dir}
  meta_file = os.path.join(dit_dir, diffusion_store.META_FILE)
  with pytest.raises(ValueError, match=rf"{meta_file}: the DiT takes 4x4x4 inputs, but it would see the data's "
                                       r"8 px images \(8x8x3, config\.diffusion\.space='pixel'\)"):
    diffusion_stage.run(_config(data_dir, **imported), str(tmp_path / "b"), mesh8)
  latent_import = {**imported, "diffusion.space": "latent", "diffusion.vae_dir": vae_dir}
  with pytest.raises(ValueError, match=r"the DiT takes 4x4x4 inputs, but it would see the 8x8x4 latents of the "
                                       r"data's 16 px images"):
    diffusion_stage.run(_config(data_dir, **latent_import, **{"data.image_size": 16}), str(tmp_path / "b"), mesh8)
  result = diffusion_stage.run(_config(data_dir, **latent_import), str(tmp_path / "c"), mesh8)
  assert result == {"model_dir": dit_dir, "class_map": None}
  assert diffusion_stage.resolve_vae(str(tmp_path / "c"))["dir"] == vae_dir
