"""Selection (RDED, DPS) and generation (dit, DAP) methods: the pieces against hand computations
(crop boxes, padded-crop scoring, stitching order, paired representativeness draws and their sign,
cluster ranking and round-robin fill, the energy and its kernels, λ = 0, the early stop), then each
method in-process on tiny data with a random DiT: deterministic, the same on 1 and 8 devices,
resumed after a SIGTERM, and the bad-input messages."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recover_utils as ru
from configs import common
from prism_jax import config_checks, errors
from prism_jax.diffusion import guidance, sampling
from prism_jax.diffusion import schedule as schedule_lib
from prism_jax.io import artifacts, layout, preemption
from prism_jax.methods import dps as dps_lib, generate, units
from prism_jax.parallel import mesh as mesh_lib
from prism_jax.patches import cluster, crops
from prism_jax.stages import distill


SIZE = ru.IMAGE_SIZE  # 16 px, 4 classes
SETTINGS = {
    "rded": dict(observer="tiny_a", mipc=10, num_crop=3, factor=2),
    "dps": dict(mipc=10, num_crop=2, n_draws=2, feature_block=2, clusters=3, top_clusters=2, factor=2),
    "dit": dict(num_steps=4, per_device_batch=1),
    "dap": dict(num_steps=4, per_device_batch=1, feature_block=2, real_per_class=3, scale=2.0, guide_fraction=0.5),
}


def write_dit(workdir: str, class_names=ru.CLASS_NAMES, **kwargs):
  ru.write_random_dit(workdir, class_names, **kwargs)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("selgen")
  return {"data": ru.write_tiny_arrays(str(root / "data"), per_class=10),
          "teachers": ru.write_random_teachers(str(root / "teachers")), "root": root}


def make_config(assets, names=("rded", "dps", "dit", "dap"), **overrides):
  c = common.base_config()
  c.data = common.data_config(source="arrays", name="tiny", path=assets["data"])
  c.teachers_dir = assets["teachers"]
  c.diffusion.model = "T/2"
  c.recover.ipc = 2
  c.progress_interval_s = 0.0
  c.image_sets = ()
  for name in names:
    common.add_method(c, name, name, **{**SETTINGS[name], **overrides.get(name, {})})
  config_checks.validate(c)
  return c


def make_workdir(path):
  workdir = str(path)
  write_dit(workdir)
  return workdir


def set_images(workdir, name):
  with np.load(layout.images_file(workdir, name)) as z:
    return {k: z[k] for k in ("images", "labels", "ipc_index")}


def manifest(workdir, name):
  return [json.loads(line) for line in open(layout.manifest_file(workdir, name))]


@pytest.fixture(scope="module")
def run8(assets, tmp_path_factory):
  workdir = make_workdir(tmp_path_factory.mktemp("run8"))
  result = distill.run(make_config(assets), workdir, mesh_lib.make_mesh(8))
  return workdir, result


# ----------------------------------------------------------------------------- pieces

def test_crop_boxes_follow_torchvision_bounds_and_are_seeded():
  boxes = [crops.random_resized_crop_box(units.unit_rng(0, "t", i), 32, 32) for i in range(200)]
  assert all(0 <= t and 0 <= l and t + h <= 32 and l + w <= 32 and h == w for t, l, h, w in boxes)
  areas = np.array([h * w for _, _, h, w in boxes]) / 1024
  assert areas.min() >= 0.08 - 0.02 and areas.max() <= 1.0 and areas.std() > 0.1
  assert crops.random_resized_crop_box(units.unit_rng(0, "t", 3), 32, 32) == boxes[3]
  # An impossible ratio falls back to torchvision's central crop with the ratio clamped.
  assert crops.random_resized_crop_box(np.random.default_rng(0), 10, 40, scale=(1.0, 1.0), ratio=(1.0, 1.0)) == (0, 15, 10, 10)


def test_stitching_order_is_rdeds():
  ipc, factor, cell = 3, 2, 4
  ranked = np.stack([np.full((cell, cell, 1), k, np.uint8) for k in range(ipc * factor * factor)])
  images, which = crops.stitch(ranked, ipc, factor, 2 * cell)
  for t in range(ipc):
    # cell k (row-major) of image t holds rank k * ipc + t
    grid = images[t, ::cell, ::cell, 0]
    np.testing.assert_array_equal(grid.reshape(-1), [k * ipc + t for k in range(4)])
    np.testing.assert_array_equal(which[t], [k * ipc + t for k in range(4)])
  assert crops.cell_sizes(9, 2) == [5, 4]
  np.testing.assert_array_equal(crops.nearest_resize(np.arange(4).reshape(2, 2, 1), 4, 4)[:, :, 0],
                                [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
  padded = crops.pad_centered(np.ones((1, 2, 2, 1)), 6)
  assert padded.sum() == 4 and padded[0, 2:4, 2:4, 0].all()


def test_rded_scores_padded_crops_by_ce_and_stitches_the_best(run8, assets):
  """The set equals a hand computation from its manifest: each cell is the recorded crop, the recorded
  score is the observer's CE of that crop zero-padded to full size, each image's kept crop beats its
  other crops, and the class's cells are its lowest-CE kept crops in RDED's stitching order."""
  workdir, _ = run8
  dataset = distill.sources.open_dataset(make_config(assets).data)
  models, variables, _ = ru.teacher_set(("tiny_a",), assets["teachers"], dataset)
  mean, std = np.asarray(dataset.mean, np.float32), np.asarray(dataset.std, np.float32)

  def ce(patches, label):
    x = crops.pad_centered((patches.astype(np.float32) / 255 - mean) / std, SIZE)
    logits = models[0].apply(variables[0], jnp.asarray(x), train=False)
    return np.asarray(-jax.nn.log_softmax(logits)[:, label])

  got = set_images(workdir, "rded")
  records = manifest(workdir, "rded")
  half = SIZE // 2
  for klass in range(4):
    cells = [(r["ipc_index"], k, cell) for r in records if r["class"] == klass for k, cell in enumerate(r["cells"])]
    by_rank = sorted(cells, key=lambda c: c[2]["rank"])
    assert [c[2]["rank"] for c in by_rank] == list(range(8))
    scores = [c[2]["score"] for c in by_rank]
    assert scores == sorted(scores)                         # lowest CE first
    for t, k, cell in cells:
      assert cell["rank"] == k * 2 + t                      # RDED's order
      source = dataset.read("train", [cell["train_index"]])[0]
      patch = crops.crop_resize(source, cell["box"], half)
      np.testing.assert_allclose(ce(patch[None], klass)[0], cell["score"], rtol=1e-4, atol=1e-5)
      row = np.flatnonzero((got["labels"] == klass) & (got["ipc_index"] == t))[0]
      r0, c0 = divmod(k, 2)
      np.testing.assert_array_equal(got["images"][row, r0 * half:(r0 + 1) * half, c0 * half:(c0 + 1) * half], patch)
      # The kept crop has the lowest CE among the image's crops.
      boxes = distill.methods.rded.crop_boxes(0, "rded/crops", klass, cell["train_index"], 3, SIZE, (0.08, 1), (1, 1))
      others = ce(np.stack([crops.crop_resize(source, b, half) for b in boxes]), klass)
      assert cell["score"] <= others.min() + 1e-5
    # The 2 candidate images left out have no kept crop better than the worst cell.
    used = {c[2]["train_index"] for c in cells}
    assert len(used) == 8
    for index in set(dataset.class_indices("train")[klass]) - used:
      source = dataset.read("train", [index])[0]
      boxes = distill.methods.rded.crop_boxes(0, "rded/crops", klass, index, 3, SIZE, (0.08, 1), (1, 1))
      assert ce(np.stack([crops.crop_resize(source, b, half) for b in boxes]), klass).min() >= max(scores) - 1e-5


class _OracleDiT:
  """A stand-in for the DiT: knows the clean input z (its 'variables'), so for the true label it
  predicts the exact noise of z_t; for the null label it predicts zeros."""

  def __init__(self, schedule, label):
    self.schedule, self.label = schedule, label

  def apply(self, z, x_t, t, y):
    ab = self.schedule.alphas_cumprod[t][:, None, None, None]
    z2 = jnp.concatenate([z, z])
    eps = (x_t - jnp.sqrt(ab) * z2) / jnp.sqrt(1 - ab)
    return jnp.where((y == self.label)[:, None, None, None], eps, 0.0)


def test_dps_representativeness_pairs_its_draws_and_low_means_typical():
  schedule = schedule_lib.DiffusionSchedule.linear()
  z = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2))
  keys = jnp.asarray(units.unit_keys(0, "test", np.arange(3)[:, None]))
  model = _OracleDiT(schedule, label=1)
  r = np.asarray(dps_lib.representativeness(model, z, z, jnp.full((3,), 1), 5, keys, schedule, 4, (0.1, 0.7)))
  # Paired draws: the conditional error is 0, the null one is ||eps||^2 of the same eps: R = -mean ||eps_d||^2.
  want = []
  for b in range(3):
    total = 0.0
    for d in range(4):
      k = jax.random.fold_in(keys[b], d)
      t = int(jax.random.randint(jax.random.fold_in(k, 0), (), 100, 700))
      assert 100 <= t < 700
      eps = jax.random.normal(jax.random.fold_in(k, 1), (4, 4, 2))
      total += float(jnp.sum(eps ** 2))
    want.append(-total / 4)
  np.testing.assert_allclose(r, want, rtol=1e-4)
  # A crop the model explains with its label scores lower (more typical) than one it does not.
  wrong = np.asarray(dps_lib.representativeness(_OracleDiT(schedule, label=0), z, z, jnp.full((3,), 1), 5, keys,
                                                schedule, 4, (0.1, 0.7)))
  assert np.all(r < wrong) and np.allclose(wrong, 0.0, atol=1e-6)


def test_cluster_ranking_and_round_robin_fill_on_a_known_case():
  rng = np.random.default_rng(0)
  centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  features = np.concatenate([c + 0.1 * rng.standard_normal((4, 2)) for c in centres])
  # Cluster B (rows 4-7) most typical (lowest R), then C, then A.
  scores = np.concatenate([np.full(4, 3.0), np.full(4, -1.0), np.full(4, 1.0)])
  out = cluster.select(features, scores, 5, clusters=3, top_clusters=2, rng=np.random.default_rng(1))
  groups = [set(range(4 * g, 4 * g + 4)) for g in range(3)]
  # Round-robin from the top two clusters (B, C): B0, C0, B1, C1, B2 - members nearest the centroid first.
  expected_groups = [1, 2, 1, 2, 1]
  assert [next(g for g, s in enumerate(groups) if i in s) for i in out["index"]] == expected_groups
  np.testing.assert_array_equal(out["cluster_rank"], [0, 1, 0, 1, 0])
  np.testing.assert_array_equal(out["member_rank"], [0, 0, 1, 1, 2])
  for g in (1, 2):
    members = [i for i in out["index"] if i in groups[g]]
    d = np.linalg.norm(features[members] - features[sorted(groups[g])].mean(0), axis=1)
    assert np.all(np.diff(d) >= 0)
  # select='max' ranks the clusters the other way: the highest median first (cluster A).
  out = cluster.select(features, scores, 3, clusters=3, top_clusters=1, rng=np.random.default_rng(1),
                       lowest_first=False)
  assert set(out["index"]) <= groups[0] and list(out["cluster_rank"]) == [0, 0, 0]
  # More picks than the top clusters hold: the next cluster joins.
  out = cluster.select(features, scores, 10, clusters=3, top_clusters=2, rng=np.random.default_rng(1))
  assert len(set(out["index"])) == 10 and set(out["cluster_rank"]) == {0, 1, 2}


def test_energy_kernels_match_their_formulas():
  phi = jnp.array([1.0, 2.0])
  refs = jnp.array([[0.0, 0.0], [2.0, 2.0], [1.0, 5.0]])
  np.testing.assert_allclose(guidance.energy(phi, refs, "linear"), np.sum((np.array([1, 2]) - refs.mean(0)) ** 2),
                             rtol=1e-6)
  d2 = np.array([5.0, 1.0, 9.0])
  np.testing.assert_allclose(guidance.energy(phi, refs, "rbf", 1.5), np.mean(2 * (1 - np.exp(-d2 / (2 * 1.5 ** 2)))),
                             rtol=1e-6)
  # Median heuristic: pairwise squared distances 8, 26, 10 -> sigma^2 = 10 / 2.
  np.testing.assert_allclose(guidance.median_bandwidth(refs), np.sqrt(5.0), rtol=1e-6)
  eps, grad = jnp.ones((2, 1, 1, 1)), jnp.full((2, 1, 1, 1), 2.0)
  ab = jnp.array([0.75, 0.0])
  np.testing.assert_allclose(guidance.guide_eps(eps, grad, ab, 3.0)[:, 0, 0, 0], [1 + 3 * 0.5 * 2, 1 + 3 * 2])


# ----------------------------------------------------------------------------- methods in-process

def test_every_method_writes_its_set_and_manifest_fields(run8):
  workdir, result = run8
  assert {k: v["num_images"] for k, v in result.items()} == {"rded": 8, "dps": 8, "dit": 8, "dap": 8}
  for name in ("rded", "dps", "dit", "dap"):
    got = set_images(workdir, name)
    assert got["images"].shape == (8, SIZE, SIZE, 3) and got["images"].dtype == np.uint8
    np.testing.assert_array_equal(got["labels"], np.tile(np.arange(4), 2))      # (IPC index, class) order
    np.testing.assert_array_equal(got["ipc_index"], np.repeat(np.arange(2), 4))
    assert len(os.listdir(os.path.join(layout.distilled_dir(workdir, name), "images"))) == 4
    assert got["images"].std() > 5                                             # not blank
  dps = manifest(workdir, "dps")
  assert all(len(r["cells"]) == 4 and {"cluster", "score", "box", "train_index"} <= set(r["cells"][0]) for r in dps)
  assert len({c["score"] for r in dps for c in r["cells"]}) > 1
  dap = manifest(workdir, "dap")
  assert all(r["guided_steps"] == 2 and len(r["energy"]) == 3 and r["energy_before"] == r["energy"][0] for r in dap)
  assert manifest(workdir, "dit")[0]["timesteps"] == [750, 0]
  assert not np.array_equal(set_images(workdir, "dit")["images"], set_images(workdir, "dap")["images"])


def test_one_and_eight_devices_make_the_same_sets(run8, assets, tmp_path):
  workdir8, _ = run8
  workdir1 = make_workdir(tmp_path / "one")
  # One device running 8 units per batch: the same batches as 8 devices running one each.
  distill.run(make_config(assets, names=("rded", "dps", "dap"), dap={"per_device_batch": 8}), workdir1,
              mesh_lib.make_mesh(1))
  for name in ("rded", "dps"):
    np.testing.assert_array_equal(set_images(workdir1, name)["images"], set_images(workdir8, name)["images"])
    m1, m8 = manifest(workdir1, name), manifest(workdir8, name)
    scores = lambda m: np.array([c.pop("score") for r in m for c in r["cells"]])
    np.testing.assert_allclose(scores(m1), scores(m8), rtol=1e-5, atol=1e-6)  # the last bits differ by batch
    assert m1 == m8
  for name in ("dap",):  # dit is DAP's sampler (the zero-scale test shows it bit for bit)
    a = set_images(workdir1, name)["images"].astype(int)
    b = set_images(workdir8, name)["images"].astype(int)
    assert np.abs(a - b).max() <= 2, name


def test_dap_with_zero_scale_is_exactly_dit_and_guidance_lowers_the_energy(run8, assets, tmp_path):
  workdir8, _ = run8
  workdir = make_workdir(tmp_path / "zero")
  distill.run(make_config(assets, names=("dap",), dap={"scale": 0.0}), workdir, mesh_lib.make_mesh(8))
  np.testing.assert_array_equal(set_images(workdir, "dap")["images"], set_images(workdir8, "dit")["images"])
  plain = {(r["class"], r["ipc_index"]): r["energy"] for r in manifest(workdir, "dap")}
  guided = {(r["class"], r["ipc_index"]): r["energy"] for r in manifest(workdir8, "dap")}
  for key, e0 in plain.items():
    e1 = guided[key]
    assert e1[0] == pytest.approx(e0[0], rel=1e-5)          # the same x_T
    assert np.mean(e1[1:]) < np.mean(e0[1:]), key            # guided trajectory: lower energy
  # The RBF kernel (median-heuristic bandwidth) runs the same way, its energies in [0, 2] (2: saturated, far
  # from every reference).
  rbf = make_workdir(tmp_path / "rbf")
  distill.run(make_config(assets, names=("dap",), dap={"kernel": "rbf", "per_device_batch": 8}), rbf,
              mesh_lib.make_mesh(1))
  records = manifest(rbf, "dap")
  assert all(r["kernel"] == "rbf" and all(0.0 <= e <= 2.0 for e in r["energy"]) and r["energy"][0] < 2.0 for r in records)


def test_dap_guides_only_the_first_fraction_of_the_steps(assets, tmp_path, monkeypatch):
  seen = {"cfg": [], "update": []}
  cfg, update = generate._cfg_eps, generate._update

  def cfg_spy(*args, **kwargs):
    out = cfg(*args, **kwargs)
    seen["cfg"].append(np.asarray(units.to_host(out)))
    return out

  def update_spy(x, eps, *args, **kwargs):
    seen["update"].append(np.asarray(units.to_host(eps)))
    return update(x, eps, *args, **kwargs)
  monkeypatch.setattr(generate, "_cfg_eps", cfg_spy)
  monkeypatch.setattr(generate, "_update", update_spy)
  workdir = make_workdir(tmp_path / "frac")
  config = make_config(assets, names=("dap",), dap={"num_steps": 5, "guide_fraction": 0.4, "per_device_batch": 8})
  distill.run(config, workdir, mesh_lib.make_mesh(1))
  assert len(seen["cfg"]) == 5 * 1  # one batch of 8 units, 5 steps
  for step, (plain, used) in enumerate(zip(seen["cfg"], seen["update"])):
    if step < 2:
      assert np.abs(plain - used).max() > 1e-6, step   # guided
    else:
      np.testing.assert_array_equal(plain, used)       # plain DDIM after the early stop
  assert sampling.num_guided_steps(5, 0.4) == 2


def test_a_sigterm_between_units_keeps_them_and_the_rerun_makes_the_same_set(run8, assets, tmp_path, monkeypatch):
  workdir8, _ = run8
  workdir = make_workdir(tmp_path / "kill")
  config = make_config(assets, names=("rded", "dit"))
  calls = {"n": 0}

  def requested():
    calls["n"] += 1
    return calls["n"] == 3  # the third unit of the first set
  monkeypatch.setattr(preemption, "requested", requested)
  with pytest.raises(preemption.Preempted):
    distill.run(config, workdir, mesh_lib.make_mesh(8))
  assert not os.path.exists(layout.distilled_marker(workdir, "rded"))     # nothing taken for finished
  assert len(os.listdir(os.path.join(layout.distilled_dir(workdir, "rded"), "units"))) == 2
  monkeypatch.setattr(preemption, "requested", lambda: False)
  result = distill.run(config, workdir, mesh_lib.make_mesh(8))
  assert result["rded"]["units_reused"] == 2
  for name in ("rded", "dit"):
    np.testing.assert_array_equal(set_images(workdir, name)["images"], set_images(workdir8, name)["images"])
  # A damaged kept unit is made again, not trusted.
  unit = os.path.join(layout.distilled_dir(workdir, "dit"), "units", "batch_00000.npz")
  with open(unit, "r+b") as f:
    f.truncate(100)
  os.remove(layout.distilled_marker(workdir, "dit"))
  result = distill.run(config, workdir, mesh_lib.make_mesh(8))
  assert result["dit"]["units_reused"] == 0
  np.testing.assert_array_equal(set_images(workdir, "dit")["images"], set_images(workdir8, "dit")["images"])


# ----------------------------------------------------------------------------- bad input

def test_bad_input_is_named(assets, tmp_path):
  c = make_config(assets, names=("dit",))
  c.diffusion.model = ""
  with pytest.raises(errors.ConfigError, match=r"methods.dit.settings: method 'dit' needs a diffusion model"):
    config_checks.validate(c)
  # No model in the work directory.
  with pytest.raises(artifacts.ArtifactError, match="no DiT here; run the diffusion stage"):
    distill.run(make_config(assets, names=("dap",)), str(tmp_path / "empty"), mesh_lib.make_mesh(1))
  # A model whose classes are not the data's, and no class map.
  wrong = str(tmp_path / "wrong")
  write_dit(wrong, class_names=("a", "b", "c", "d", "e"))
  with pytest.raises(artifacts.ArtifactError, match=r"model.json: the DiT's 5 classes .* no class map"):
    distill.run(make_config(assets, names=("dit",)), wrong, mesh_lib.make_mesh(1))
  workdir = make_workdir(tmp_path / "ok")
  # IPC larger than the candidates a class offers (10 training images per class; factor 2: 4 cells per image).
  with pytest.raises(errors.ConfigError, match=r"methods.rded.settings.ipc=3 with factor 2 needs 12 crops .* offers 10"):
    distill.run(make_config(assets, names=("rded",), rded={"ipc": 3}), workdir, mesh_lib.make_mesh(1))
  with pytest.raises(artifacts.ArtifactError, match=r"no teacher 'tiny_nobn' \(needed by methods.rded.settings.observer\)"):
    distill.run(make_config(assets, names=("rded",), rded={"observer": "tiny_nobn"}), workdir, mesh_lib.make_mesh(1))
  with pytest.raises(errors.ConfigError, match=r"methods.dps.settings.factor=3: does not divide the image size 16"):
    distill.run(make_config(assets, names=("dps",), dps={"factor": 3, "ipc": 1}), workdir, mesh_lib.make_mesh(1))
  with pytest.raises(errors.ConfigError, match=r"methods.dap.settings.feature_block=5: the DiT .* has 4 blocks"):
    distill.run(make_config(assets, names=("dap",), dap={"feature_block": 5}), workdir, mesh_lib.make_mesh(1))
  with pytest.raises(errors.ConfigError, match=r"methods.dap.settings.real_per_class=11: class 0 \('ant'\) has only 10"):
    distill.run(make_config(assets, names=("dap",), dap={"real_per_class": 11}), workdir, mesh_lib.make_mesh(1))
  for name, field, value, message in (("dps", "select", "median", "expected 'min'"),
                                      ("dap", "kernel", "poly", "expected one of"),
                                      ("dap", "guide_fraction", 1.5, r"expected a value in \[0, 1\]"),
                                      ("rded", "scale", (0.5, 0.1), "expected \\(low, high\\)")):
    with pytest.raises(errors.ConfigError, match=f"methods.{name}.settings.{field}=.*{message}"):
      make_config(assets, names=(name,), **{name: {field: value}})
  # Nothing of the refused runs is taken for a finished set.
  for name in ("rded", "dps", "dap"):
    assert not os.path.exists(layout.distilled_marker(workdir, name))


# ----------------------------------------------------------------------------- the CLI on digits

DIGITS_SHORT = (
    "--config.stage=distill,evaluate", "--config.recover.iterations=2", "--config.recover.iteration_step=1",
    "--config.recover.iterations_per_call=2", "--config.methods.rded.settings.mipc=8",
    "--config.methods.dps.settings.mipc=8", "--config.methods.dit.settings.num_steps=2",
    "--config.methods.dap.settings.num_steps=2", "--config.methods.dap.settings.real_per_class=2",
    "--config.progress_interval_s=0",
)


def test_every_method_runs_through_the_cli_on_digits(tmp_path):
  """configs/digits_methods.py's distill and evaluate stages through the CLI, with a random teacher and
  a random DiT in place of the squeezed and trained ones: every method makes its set and the report
  shows them with the method figures. (Relabel and student training treat these sets like any other:
  tests/test_configs.py runs them for every method in-process, test_methods.py through the CLI.)"""
  from cli_utils import run_cli
  from prism_jax.data import sources
  from configs import digits_methods
  dataset = sources.open_dataset(digits_methods.get_config().data)
  workdir, teachers = str(tmp_path / "digits"), str(tmp_path / "teachers")
  ru.write_random_teacher(teachers, "resnet18", class_names=dataset.class_names, size=dataset.image_size)
  ru.write_random_dit(workdir, dataset.class_names, size=dataset.image_size)
  result = run_cli("configs/digits_methods.py", workdir, *DIGITS_SHORT, f"--config.teachers_dir={teachers}",
                   timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  names = ("random_real", "random_real_s1", "prism", "rded", "dps", "dit", "dap")
  for name in names:
    assert f"[distill {name}] 20 images" in result.stdout, name
  results = json.load(open(os.path.join(workdir, "evaluate", "results.json")))
  rows = {r["method"]: r for r in results["rows"]}
  assert set(rows) == set(names) and all(row["images"] == 20 for row in rows.values())
  assert all(0.0 <= rows[n]["intra_cos"] <= 1.0 for n in names)
  assert manifest(workdir, "dap")[0]["guided_steps"] == 1
  from PIL import Image
  for figure in ("dps_clusters.png", "dap_guidance.png", "grid.png"):
    picture = Image.open(os.path.join(workdir, "evaluate", figure))
    assert picture.size[0] > 100 and picture.size[1] > 100, figure
    assert figure in open(os.path.join(workdir, "evaluate", "report.md")).read()


def test_evaluate_adds_hlr_and_lrs_from_a_hard_label_run(tmp_path):
  """evaluate's DD-Ranking columns: IOR against the random draws, HLR from another work directory's
  hard-label results and the full-data accuracy, LRS from both (metrics/ranking.py's formula)."""
  import ml_collections
  from prism_jax.metrics import ranking
  from prism_jax.stages import evaluate
  names = ("random_real", "random_real_s1", "prism")
  hard = tmp_path / "hard"
  os.makedirs(hard / "evaluate")
  artifacts.write_json(str(hard / "evaluate" / "results.json"), {"protocol": "hard_label", "rows": [
      {"method": n, "top1_best": {"mean": 20.0 + i, "std": 0.0}} for i, n in enumerate(names)]})
  rows = [{"method": n, "top1_best": {"mean": acc, "std": 0.0}} for n, acc in zip(names, (40.0, 44.0, 50.0))]
  ev = ml_collections.ConfigDict({"random_sets": names[:2], "hard_label_workdir": str(hard), "full_data_top1": 90.0,
                                  "lrs_weight": 0.5})
  assert evaluate._add_ranking(rows, ev) == ("ior", "hlr", "lrs")
  for i, row in enumerate(rows):
    assert row["ior"]["mean"] == pytest.approx(row["top1_best"]["mean"] - 42.0) and row["ior"]["std"] == 2.0
    assert row["hlr"] == pytest.approx(90.0 - (20.0 + i))
    assert row["lrs"] == pytest.approx(ranking.lrs(row["ior"]["mean"] / 100, row["hlr"] / 100))
  # Only IOR without the hard-label inputs; a soft-label directory is refused as the hard-label run.
  ev.hard_label_workdir, ev.full_data_top1 = "", -1.0
  assert evaluate._add_ranking([dict(r) for r in rows], ev) == ("ior",)
  artifacts.write_json(str(hard / "evaluate" / "results.json"), {"protocol": "prism", "rows": []})
  ev.hard_label_workdir = str(hard)
  with pytest.raises(artifacts.ArtifactError, match="must be a hard_label run"):
    evaluate._add_ranking([dict(r) for r in rows], ev)
