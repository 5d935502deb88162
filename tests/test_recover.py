"""The recover method (distill stage, set 'recover'): outputs, device-count independence, sharding, resume, bad input."""

import json
import os
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import recover_utils as ru
from cli_utils import REPO_ROOT, cli_command, cli_env, run_cli
from configs import common
from prism_jax.io import artifacts
from prism_jax.parallel import mesh as mesh_lib
from prism_jax.data import stats as data_stats
from prism_jax.io import teacher_store
from prism_jax.recover import engine, runner, schedule, selection
from prism_jax.recover import plan as recover_plan


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("recover_assets")
  data = ru.write_tiny_arrays(str(root / "data"))
  teachers = str(root / "teachers")
  for name in ("tiny_a", "tiny_b", "tiny_nobn", "resnet18"):
    ru.write_random_teacher(teachers, name)
  return {"data": data, "teachers": teachers, "root": root}


def make_config(assets, **recover_overrides):
  c = common.base_config()
  c.data = common.data_config(source="arrays", name="tiny", path=assets["data"])
  c.teachers_dir = recover_overrides.pop("teachers_dir", assets["teachers"])
  rc = c.recover
  rc.ipc, rc.classes_per_batch = 3, 2
  rc.logit_teacher, rc.bn_pool = "tiny_a", ("tiny_b", "tiny_nobn")
  rc.distribution, rc.fixed_teachers, rc.k_max = "fixed", ("tiny_a", "tiny_b"), 3
  rc.iterations, rc.iteration_step, rc.iteration_period = 6, 2, 2
  rc.iterations_per_call = 3
  rc.learning_rate = 0.05
  c.progress_interval_s = 0.0
  for k, v in recover_overrides.items():
    rc[k] = v
  return c


@pytest.fixture(scope="module")
def eight_device_run(assets, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("recover8"))
  # The accelerator path (device loop, per-teacher conditionals); the 1-device run below takes
  # the CPU default (host-driven iterations, static teacher sets) and must give the same images.
  meta = ru.run_recover(make_config(assets, teacher_gating="cond"), workdir, mesh_lib.make_mesh(8))
  return workdir, meta


def test_outputs_images_folder_array_file_and_manifest(eight_device_run):
  workdir, meta = eight_device_run
  out = os.path.join(workdir, "recover")
  arrays = np.load(os.path.join(out, "images.npz"))
  assert arrays["images"].shape == (12, 16, 16, 3) and arrays["images"].dtype == np.uint8
  np.testing.assert_array_equal(arrays["labels"], np.tile(np.arange(4), 3))
  np.testing.assert_array_equal(arrays["ipc_index"], np.repeat(np.arange(3), 4))
  assert list(arrays["class_names"]) == list(ru.CLASS_NAMES)
  for image, label, ipc in zip(arrays["images"], arrays["labels"], arrays["ipc_index"]):
    png = os.path.join(out, "images", f"{label:04d}_{ru.CLASS_NAMES[label]}", f"ipc{ipc:04d}.png")
    np.testing.assert_array_equal(np.asarray(Image.open(png)), image)  # lossless
  lines = [json.loads(l) for l in open(os.path.join(out, "manifest.jsonl"))]
  assert len(lines) == 12
  first = lines[0]
  assert first["bn_teachers"] == ["tiny_a", "tiny_b"] and first["logit_teacher"] == "tiny_a"
  assert [l["iterations"] for l in lines[::4]] == [6, 4, 6]
  assert {"class", "ipc_index", "chunk", "seed", "final_ce", "final_bn", "wall_seconds"} <= set(first)
  assert all(np.isfinite(l["final_ce"]) and l["final_bn"] > 0 for l in lines)
  # 6 units on 8 devices: one wave, 2 padding slots; useful work = needed / executed.
  assert meta["num_waves"] == 1
  # Per-teacher conds: nothing runs for padding rows or finished units.
  assert meta["useful_work"]["useful_fraction"] == 1.0
  # Each device holds one unit (3 x 2 chunks, costs 12, 12, 12, 12, 8, 8); the wave lasts 12.
  assert meta["useful_work"]["device_occupancy"] == pytest.approx((4 * 12 + 2 * 8) / (8 * 12))
  # The images moved away from their real-image initialization but stayed in range.
  assert json.load(open(os.path.join(out, "recover.json")))["num_images"] == 12


def test_same_images_on_one_and_eight_devices_and_with_either_gating(assets, eight_device_run, tmp_path):
  workdir8, _ = eight_device_run
  # Also: tiny_b's gradient taken in 2 pieces of the 2-image batches (exact, so the same images).
  meta = ru.run_recover(make_config(assets, teacher_pieces="tiny_b=2"), str(tmp_path), mesh_lib.make_mesh(1))
  assert recover_plan.teacher_gating(make_config(assets).recover) == "static"  # the CPU default
  assert meta["useful_work"]["useful_fraction"] == 1.0  # one unit per wave: nothing unneeded
  got, want = ru.wave_images(str(tmp_path)), ru.wave_images(workdir8)
  assert sorted(got) == sorted(want) == [(i, c) for i in range(3) for c in range(2)]
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-4)
  # Optimization did something, and the clip kept every pixel in the valid range.
  init = runner.initial_images([schedule.Unit(0, 0, (0, 1), "resnet18", ("resnet18",), 6)],
                                _dataset(assets), make_config(assets).recover, seed=0)[0]
  assert np.abs(want[(0, 0)] - init).max() > 1e-3
  ds = _dataset(assets)
  low, high = (np.asarray(b) for b in data_stats.pixel_bounds(ds.mean, ds.std))
  for images in want.values():
    assert (images >= low - 1e-6).all() and (images <= high + 1e-6).all()


def _dataset(assets):
  from prism_jax.data import sources
  return sources.open_dataset(make_config(assets).data)


def test_rerun_is_noop_and_other_config_is_refused(assets, eight_device_run):
  workdir, meta = eight_device_run
  again = ru.run_recover(make_config(assets), workdir, mesh_lib.make_mesh(8))
  assert again["num_images"] == 12
  with pytest.raises(artifacts.ArtifactError, match="recover.learning_rate: this run has 0.1"):
    ru.run_recover(make_config(assets, learning_rate=0.1), workdir, mesh_lib.make_mesh(8))


def test_compiled_step_has_no_cross_device_collective(assets):
  ds = _dataset(assets)
  teachers = teacher_store.load_teacher_set(("tiny_a", "tiny_b"), assets["teachers"], class_names=ds.class_names,
                                            needed_by="this test")
  mesh = mesh_lib.make_mesh(8)
  width, classes, size = 8, 2, ru.IMAGE_SIZE
  data = mesh_lib.data_sharding(mesh)
  put = lambda x: jax.device_put(x, data)
  state = {k: put(v) for k, v in engine.init_state(jnp.zeros((width, classes, size, size, 3))).items()}
  keys = put(jax.random.key_data(jax.random.split(jax.random.key(0), width)))
  args = [keys, put(jnp.zeros((width, classes), jnp.int32)), put(jnp.full((width,), 4, jnp.int32)),
          put(jnp.ones((width, 4, 2))), put(jnp.ones((width, 4, 2)))]
  tvars = mesh_lib.replicate(teachers.variables, mesh)
  cfg = engine.StepConfig(("tiny_a", "tiny_b"), size, (-2.0,) * 3, (2.0,) * 3, 0.05, 10.0, 2)
  models = teachers.models
  step = jax.jit(engine.run_iterations, static_argnames=("models", "cfg", "mesh"))
  lowered = step.lower(state, *args, tvars, np.int32(0), np.int32(4), models=models, cfg=cfg, mesh=mesh)
  hlo = lowered.compile().as_text()
  for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter"):
    assert op not in hlo, op
  out = step(state, *args, tvars, np.int32(0), np.int32(4), models=models, cfg=cfg, mesh=mesh)
  assert out["images"].sharding.spec == data.spec


def test_teacher_weights_follow_k_averaging(assets):
  rc = make_config(assets, distribution="bernoulli").recover
  spec = recover_plan.selection_spec(rc)
  unit = schedule.Unit(0, 0, (0, 1), "resnet18", ("resnet18", "alexnet"), 5)
  has_bn = {"resnet18": True, "mobilenet_v2": True, "alexnet": False}
  order = ("resnet18", "alexnet")
  ce, bn = recover_plan.teacher_weights(unit, order, spec, rc, 0, has_bn, 5)
  np.testing.assert_allclose(ce, [[1.0, 0.0]] * 5)
  np.testing.assert_allclose(bn, [[0.01 / 2, 0.01 / 2]] * 5)  # alexnet counts in K (official)
  rc.count_bn_only = True
  _, bn = recover_plan.teacher_weights(unit, order, spec, rc, 0, has_bn, 5)
  np.testing.assert_allclose(bn, [[0.01, 0.01]] * 5)


@pytest.mark.parametrize("overrides, error, pattern", [
    (dict(distribution="bernoulli", bn_pool=("efficientnet_b0",), k_max=2), artifacts.ArtifactError,
     r"efficientnet_b0: no teacher 'efficientnet_b0'"),
    (dict(distribution="single", logit_teacher="tiny_nobn", bn_pool=("tiny_b",)), ValueError, "has no BatchNorm layer"),
    (dict(distribution="bernoulli", k_max=4), ValueError, r"recover.k_max=4 needs 3 extra BN teachers"),
    (dict(ipc=4), ValueError, r"recover.ipc=4 .* class 0 \('ant'\) has only 3"),
    (dict(teacher_pieces="tiny_c=2"), ValueError, r"'tiny_c' is not a teacher of this recovery"),
    (dict(teacher_pieces="tiny_b=0"), ValueError, r"expected 'name=n' items with n >= 1"),
    (dict(teacher_gating="loop"), ValueError, r"recover.teacher_gating='loop'"),
])
def test_bad_recover_configs(assets, tmp_path, overrides, error, pattern):
  with pytest.raises(error, match=pattern):
    ru.run_recover(make_config(assets, **overrides), str(tmp_path), mesh_lib.make_mesh(1))


def test_teachers_for_another_class_order_are_refused(assets, tmp_path):
  teachers = str(tmp_path / "teachers")
  ru.write_random_teacher(teachers, "tiny_a", class_names=tuple(reversed(ru.CLASS_NAMES)))
  ru.write_random_teacher(teachers, "tiny_b")
  with pytest.raises(artifacts.ArtifactError, match="class count or order differs"):
    ru.run_recover(make_config(assets, teachers_dir=teachers), str(tmp_path / "w"), mesh_lib.make_mesh(1))


def test_non_finite_loss_stops_naming_batch_and_keeps_finished_waves(assets, tmp_path):
  teachers = str(tmp_path / "teachers")
  shutil.copytree(assets["teachers"], teachers)
  # Poison tiny_b: an infinite running variance makes its BN loss infinite.
  model, variables, meta = teacher_store.load_teacher(os.path.join(teachers, "tiny_b"))
  variables = jax.tree_util.tree_map(np.array, variables)  # writable copies
  first_bn = next(iter(variables["batch_stats"].values()))
  while "var" not in first_bn:
    first_bn = next(iter(first_bn.values()))
  first_bn["var"][:] = np.inf
  teacher_store.save_teacher(os.path.join(teachers, "tiny_b"), name="tiny_b", variables=variables,
                             model_config=meta["model"], class_names=meta["class_names"],
                             dataset=meta["dataset"], test_accuracy=None)
  config = make_config(assets, teachers_dir=teachers, distribution="bernoulli", k_max=2,
                       bn_pool=("tiny_b",), p=0.5, ipc=3, classes_per_batch=4,
                       iterations=20, iteration_step=16, iteration_period=2)
  # Seed 4 draws 1, 2, 1 BN teachers for IPC 0, 1, 2 (T = 20, 4, 20): the scheduler runs the
  # costlier healthy units first, then the poisoned one.
  config.seed = 4
  spec = recover_plan.selection_spec(config.recover)
  draws = [selection.pre_selection(spec, 4, i, 0, "ipc")[1] for i in range(3)]
  assert ("tiny_a",) in draws and ("tiny_a", "tiny_b") in draws  # both kinds of wave exist
  workdir = str(tmp_path / "w")
  with pytest.raises(FloatingPointError, match=r"recovery batch ipc_index=1 chunk=0, iteration 0"):
    ru.run_recover(config, workdir, mesh_lib.make_mesh(1))
  finished = ru.wave_images(workdir)
  assert sorted(finished) == [(0, 0), (2, 0)] and draws[1] == ("tiny_a", "tiny_b")


def test_cli_recover_resumes_after_kill(assets, tmp_path):
  settings = {"stage": "recover", "data.source": "arrays", "data.name": "tiny", "data.path": assets["data"],
              "teachers_dir": assets["teachers"], "recover.ipc": 3, "recover.classes_per_batch": 2,
              "recover.distribution": "fixed", "recover.fixed_teachers": ("resnet18",),
              "recover.iterations": 60, "recover.iteration_step": 0, "recover.iterations_per_call": 5,
              "recover.checkpoint_every_iterations": 10, "progress_interval_s": 0.0}
  overrides = [f"--config.{k}={v}" for k, v in settings.items()]
  workdir = str(tmp_path / "killed")
  proc = subprocess.Popen(cli_command("configs/quickstart.py", workdir, *overrides), cwd=REPO_ROOT,
                          env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wave_dir = os.path.join(workdir, "recover", "waves")
  deadline = time.time() + 240
  while time.time() < deadline:
    # Finished files only: atomic writes go through hidden temporary files (".wave...tmp").
    names = [n for n in os.listdir(wave_dir) if not n.startswith(".")] if os.path.isdir(wave_dir) else []
    if any(n.startswith("wave00000.") and "partial" not in n for n in names) and any("partial" in n for n in names):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(workdir, "recover", "recover.json")), "killed too late"
  resumed = run_cli("configs/quickstart.py", workdir, *overrides)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming at iteration" in resumed.stdout and "[recover] 12 images" in resumed.stdout
  # Reference: the same command, uninterrupted; a resumed run must give identical images.
  reference = str(tmp_path / "reference")
  assert run_cli("configs/quickstart.py", reference, *overrides).returncode == 0
  got, want = ru.wave_images(workdir), ru.wave_images(reference)
  assert sorted(got) == sorted(want) == [(i, c) for i in range(3) for c in range(2)]
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])
  np.testing.assert_array_equal(np.load(os.path.join(workdir, "recover", "images.npz"))["images"],
                                np.load(os.path.join(reference, "recover", "images.npz"))["images"])


def test_sigterm_mid_wave_saves_the_iteration_and_a_rerun_resumes(assets, eight_device_run, tmp_path, monkeypatch,
                                                                   capsys):
  import signal
  from prism_jax.io import preemption
  workdir8, _ = eight_device_run
  real = engine.static_iteration  # the CPU default gating
  calls = []

  def step_then_sigterm(*args, **kwargs):  # the notice arrives during the second iteration of wave 0
    calls.append(1)
    if len(calls) == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)

  monkeypatch.setattr(engine, "static_iteration", step_then_sigterm)
  workdir = str(tmp_path)
  with pytest.raises(preemption.Preempted, match=r"preempted \(SIGTERM\) in wave00000 at iteration 3/6"):
    ru.run_recover(make_config(assets), workdir, mesh_lib.make_mesh(1))
  assert os.path.exists(os.path.join(workdir, "recover", "waves", "wave00000.p0.partial.npz"))
  monkeypatch.setattr(engine, "static_iteration", real)
  capsys.readouterr()
  ru.run_recover(make_config(assets), workdir, mesh_lib.make_mesh(1))
  assert "wave00000: resuming at iteration 3/6" in capsys.readouterr().out
  got, want = ru.wave_images(workdir), ru.wave_images(workdir8)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-4)


def test_intra_recovery_keeps_a_bounded_number_of_programs_alive(assets, tmp_path, monkeypatch):
  """Every iteration may draw a new teacher set (strategy 'intra'): static gating runs one program
  per teacher drawn plus two, never one per set or per iteration, at most runner.MAX_LIVE_PROGRAMS
  are alive at once, and all are released when the recovery ends; the images do not depend on any
  of this."""
  def config():
    return make_config(assets, strategy="intra", distribution="bernoulli", k_max=2, bn_pool=("tiny_b",),
                       logit_pool=("tiny_b",), ipc=1, classes_per_batch=4, iterations=6, iteration_step=0,
                       iterations_per_call=6)

  seen, live, releases, sets = set(), [], [], set()
  real_track, real_release, real_iteration = runner._track_programs, runner.release_programs, engine.static_iteration

  def track(programs, width):
    seen.update((p, width) for p in programs)
    real_track(programs, width)
    live.append((len(runner._LIVE), len(programs)))

  def release():  # what is alive, in the bookkeeping and in JAX's own cache of compiled teacher programs
    releases.append((len(runner._LIVE), engine._static_teacher.cache_size()))
    real_release()

  def iteration(*args, active, **kwargs):
    sets.add(active)
    return real_iteration(*args, active=active, **kwargs)

  monkeypatch.setattr(runner, "_track_programs", track)
  monkeypatch.setattr(runner, "release_programs", release)
  monkeypatch.setattr(engine, "static_iteration", iteration)
  unbounded = str(tmp_path / "unbounded")
  ru.run_recover(config(), unbounded, mesh_lib.make_mesh(1))
  # 6 iterations, each drawing a teacher set: several distinct sets of the 2 teachers, but only
  # begin, end and one program per teacher.
  used = {k for active in sets for k in active}
  assert len(sets) >= 2 and used == {0, 1}
  assert {p for p, _ in seen} == {"begin", "end", ("teacher", 0), ("teacher", 1)} and len(seen) == 4
  assert max(n for n, _ in live) == len(seen) and releases == [(len(seen), 2)]  # 2 compiled teacher programs
  assert runner._LIVE == set() and engine._static_teacher.cache_size() == 0
  limit = 3
  monkeypatch.setattr(runner, "MAX_LIVE_PROGRAMS", limit)
  seen.clear(); live.clear(); releases.clear()
  bounded_dir = str(tmp_path / "bounded")
  ru.run_recover(config(), bounded_dir, mesh_lib.make_mesh(1))
  # At most the limit alive, or one iteration's programs where those alone pass it; released on the
  # way, and at the end.
  assert all(n <= max(limit, needed) for n, needed in live) and len(releases) >= 2
  got, want = ru.wave_images(bounded_dir), ru.wave_images(unbounded)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])
