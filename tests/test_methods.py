"""The method seam (registry, resolution, a plug-in method through the CLI), several methods in one
run, validation before any data, and the one-line error contract."""

import json
import os
import re
import sys

import numpy as np
import pytest

import recover_utils as ru
from cli_utils import run_cli
from configs import common
from prism_jax import config_checks, errors, methods
from prism_jax.io import artifacts, layout
from prism_jax.parallel import mesh as mesh_lib
from prism_jax.stages import distill


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("methods_assets")
  data = ru.write_tiny_arrays(str(root / "data"))
  teachers = ru.write_random_teachers(str(root / "teachers"), ("tiny_a", "tiny_b"))
  return {"data": data, "teachers": teachers, "root": root}


def make_config(assets):
  c = common.base_config()
  c.data = common.data_config(source="arrays", name="tiny", path=assets["data"])
  c.teachers_dir = assets["teachers"]
  rc = c.recover
  rc.ipc, rc.classes_per_batch = 2, 4
  rc.logit_teacher, rc.bn_pool = "tiny_a", ("tiny_b",)
  rc.distribution, rc.k_max = "bernoulli", 2
  rc.iterations, rc.iteration_step, rc.iteration_period = 4, 1, 2
  rc.iterations_per_call = 2
  c.progress_interval_s = 0.0
  c.image_sets = ()
  return c


def test_registry_lists_the_recover_methods_and_the_baseline():
  assert {"recover", "prism", "sre2l", "prism_intra", "multi_k3", "random_real"} <= set(methods.names())
  with pytest.raises(errors.ConfigError, match=r"methods.x.method='rded_typo': unknown method; known methods: .*prism.*"
                                               r"random_real.*sre2l"):
    c = common.base_config()
    common.add_method(c, "x", "rded_typo")
    methods.requests(c)


def test_set_names_settings_and_overrides_are_resolved_or_refused():
  c = common.base_config()
  c.recover.iterations, c.recover.ipc = 300, 3
  common.add_method(c, "sre2l", "sre2l", iterations=50)
  common.add_method(c, "baseline", "random_real", seed=7)
  assert c.image_sets == ("recover", "sre2l", "baseline")
  got = {r.name: r for r in methods.requests(c)}
  assert got["recover"].method == "recover" and got["recover"].settings.iterations == 300
  # sre2l: the shared recover settings, its preset on top, then the set's own override.
  s = got["sre2l"].settings
  assert (s.init, s.learning_rate, s.distribution, s.iteration_step, s.iterations, s.ipc) == (
      "noise", 0.25, "single", 0, 50, 3)
  assert (got["baseline"].settings.ipc, got["baseline"].settings.seed) == (3, 7)
  c.image_sets = ("recover", "sre2l", "baseline", "nonsense")
  with pytest.raises(errors.ConfigError, match=r"image_sets: 'nonsense' is not a set this run can make.*\(baseline, sre2l\)"):
    methods.requests(c)
  c.image_sets = ("recover", "sre2l")
  with pytest.raises(errors.ConfigError, match=r"methods.baseline: not in image_sets"):
    methods.requests(c)
  c.image_sets = ("recover", "sre2l", "baseline")
  c.methods.sre2l.settings.ipcc = 3
  with pytest.raises(errors.ConfigError, match=r"methods.sre2l.settings.ipcc: not a setting of this method"):
    methods.requests(c)
  del c.methods.sre2l.settings["ipcc"]
  c.methods.sre2l.settings.k_max = 0
  with pytest.raises(errors.ConfigError, match=r"methods.sre2l.settings: recover.k_max=0: expected >= 1"):
    methods.validate(c)


def test_several_methods_write_their_sets_into_one_work_directory(assets, tmp_path):
  c = make_config(assets)
  common.add_method(c, "prism", "prism", bn_pool=("tiny_b",), k_max=2, logit_teacher="tiny_a")
  common.add_method(c, "sre2l", "sre2l", logit_teacher="tiny_a", iterations=3)
  common.add_method(c, "random_real", "random_real", ipc=3, seed=2)
  workdir = str(tmp_path)
  made = distill.run(c, workdir, mesh_lib.make_mesh(2))
  assert set(made) == {"prism", "sre2l", "random_real"}
  for name, count in (("prism", 8), ("sre2l", 8), ("random_real", 12)):
    marker = artifacts.read_json(layout.distilled_marker(workdir, name))
    assert marker["num_images"] == count and marker["method"] == name
    assert layout.distilled_marker(workdir, name) == os.path.join(workdir, "sets", name, "distill", "set.json")
    arrays = np.load(layout.images_file(workdir, name))
    assert arrays["images"].shape == (count, ru.IMAGE_SIZE, ru.IMAGE_SIZE, 3)
    lines = [json.loads(l) for l in open(layout.manifest_file(workdir, name))]
    assert len(lines) == count and {l["class"] for l in lines} == {0, 1, 2, 3}
  sre2l = [json.loads(l) for l in open(layout.manifest_file(workdir, "sre2l"))]
  assert {l["iterations"] for l in sre2l} == {3} and {tuple(l["bn_teachers"]) for l in sre2l} == {("tiny_a",)}
  assert artifacts.read_json(layout.distilled_marker(workdir, "sre2l"))["fingerprint"]["recover"]["init"] == "noise"
  rr = [json.loads(l) for l in open(layout.manifest_file(workdir, "random_real"))]
  assert all(l["method"] == "random_real" and l["seed"] == 2 for l in rr)
  # The baseline's images are the training images its manifest names.
  from prism_jax.data import sources
  dataset = sources.open_dataset(c.data)
  np.testing.assert_array_equal(np.load(layout.images_file(workdir, "random_real"))["images"],
                                dataset.read("train", np.asarray([l["train_index"] for l in rr])))
  # Rerun: every set is skipped; a changed setting of one set is refused, naming the field.
  assert distill.run(c, workdir, mesh_lib.make_mesh(2))["prism"]["num_images"] == 8
  c.methods.sre2l.settings.iterations = 4
  with pytest.raises(artifacts.ArtifactError, match=r"recover.iterations: this run has 4, the artifact has 3"):
    distill.run(c, workdir, mesh_lib.make_mesh(2))


def test_a_damaged_set_is_made_again_not_trusted(assets, tmp_path, capsys):
  c = make_config(assets)
  c.image_sets = ("recover",)
  workdir = str(tmp_path)
  distill.run(c, workdir, mesh_lib.make_mesh(1))
  images = layout.images_file(workdir, "recover")
  want = open(images, "rb").read()
  with open(images, "r+b") as f:  # truncated: the marker's recorded size and checksum no longer hold
    f.truncate(len(want) // 2)
  capsys.readouterr()
  distill.run(c, workdir, mesh_lib.make_mesh(1))
  out = capsys.readouterr().out
  assert "recover/images.npz is" in out and "redoing the work" in out
  assert "wave-iteration" not in out  # the finished waves are reused: only the export is redone
  assert open(images, "rb").read() == want


PLUGIN = '''
"""A test-only method: each image is its class's mean training image, shifted by seeded noise."""
import time
import numpy as np
import ml_collections
from prism_jax.methods import base


class MeanImages(base.Method):
  name = "test_mean_images"

  def default_settings(self, config):
    return ml_collections.ConfigDict({"ipc": 2, "noise": 8.0})

  def validate(self, settings, config, field):
    if settings.ipc < 1:
      from prism_jax import errors
      raise errors.ConfigError(f"{field}.ipc={settings.ipc}: expected >= 1")

  def fingerprint(self, ctx):
    return {"settings": ctx.settings.to_dict(), "seed": ctx.config.seed, "data": ctx.dataset.fingerprint()}

  def plan(self, ctx):
    return [(c, i) for i in range(ctx.settings.ipc) for c in range(ctx.dataset.num_classes)]

  def run(self, ctx, units):
    ds = ctx.dataset
    means = [ds.read("train", ix).astype(np.float32).mean(0) for ix in ds.class_indices("train")]
    images, manifest = [], []
    for c, i in units:
      rng = np.random.default_rng([ctx.config.seed, c, i])
      images.append(np.clip(means[c] + rng.normal(0, ctx.settings.noise, means[c].shape), 0, 255).astype(np.uint8))
      manifest.append({"class": c, "ipc_index": i, "noise": ctx.settings.noise})
    labels = np.asarray([c for c, _ in units])
    base.write_set(ctx, np.stack(images), labels, np.asarray([i for _, i in units]), manifest)
    return {"num_images": len(units)}


base.register(MeanImages())
'''

CONFIG = '''
import sys
sys.path.insert(0, {tests_dir!r})
sys.path.insert(0, {plugin_dir!r})
import recover_utils  # noqa: F401  registers the tiny teachers
from configs import common


def get_config():
  c = common.base_config()
  c.stage = "distill+"
  c.data = common.data_config(source="arrays", name="tiny", path={data!r})
  c.teachers_dir = {teachers!r}
  c.method_modules = ("tiny_plugin_method",)
  c.image_sets = ()
  common.add_method(c, "mean", "test_mean_images", noise=4.0)
  common.add_method(c, "random_real", "random_real", ipc=2)
  common.set_protocol(c, "prism")
  c.relabel.teachers, c.relabel.aggregation = ("tiny_a", "tiny_b"), "norm_rescaled_mean"
  c.train.student, c.train.epochs, c.train.batch_size, c.train.accumulation = "tiny_a", 1, 4, 1
  c.train.eval_every_epochs = 1.0
  c.evaluate.reference_model, c.evaluate.umap = "tiny_a", False
  c.progress_interval_s = 0.0
  return c
'''


def test_a_plugin_method_runs_end_to_end_through_the_cli(assets, tmp_path):
  plugin_dir = tmp_path / "plugin"
  plugin_dir.mkdir()
  (plugin_dir / "tiny_plugin_method.py").write_text(PLUGIN)
  config = tmp_path / "plugin_config.py"
  config.write_text(CONFIG.format(tests_dir=TESTS_DIR, plugin_dir=str(plugin_dir), data=assets["data"],
                                  teachers=assets["teachers"]))
  workdir = str(tmp_path / "run")
  result = run_cli(str(config), workdir, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "[distill mean] 8 images" in result.stdout and "[train mean seed 0] best top-1" in result.stdout
  manifest = [json.loads(l) for l in open(layout.manifest_file(workdir, "mean"))]
  assert len(manifest) == 8 and all(l["noise"] == 4.0 for l in manifest)
  rows = {r["method"]: r for r in json.load(open(os.path.join(workdir, "evaluate", "results.json")))["rows"]}
  assert set(rows) == {"mean", "random_real"} and rows["mean"]["images"] == 8
  assert 0.0 <= rows["mean"]["top1_best"]["mean"] <= 100.0
  # A rerun of evaluate with nothing changed computes nothing.
  again = run_cli(str(config), workdir, "--config.stage=evaluate", timeout=300)
  assert again.returncode == 0 and "[evaluate] already done (inputs unchanged)" in again.stdout
  assert "mean" in again.stdout.split("[evaluate]")[0]  # the table is printed again


def test_refused_flags_and_overrides_end_in_one_line(tmp_path):
  for flag, message in (
      ("--config.recover.ipcc=2", """--config.recover.ipcc: no such config field 'ipcc' (Did you mean "ipc" instead of "ipcc"?)"""),
      ("--config.recover.ipc=abc", "flag --config.recover.ipc=abc: invalid literal for int()"),
  ):
    result = run_cli("configs/quickstart.py", str(tmp_path / "w"), flag)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"prism_jax: error: {message}"), result.stderr[-500:]
  result = run_cli("configs/cifar10_compare.py:nope", str(tmp_path / "w"))
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "parameter 'nope': expected one of ('small'" in result.stderr.strip().splitlines()[-1]


def test_a_wrong_field_of_a_later_stage_is_reported_before_anything_runs(tmp_path):
  workdir = tmp_path / "w"
  # The data path does not exist either: the config error must come first (no data opened).
  result = run_cli("configs/quickstart.py", str(workdir), "--config.train.accumulation=3",
                   "--config.data.source=arrays", "--config.data.path=/nonexistent/data")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "prism_jax: error: train.accumulation=3: expected a divisor of train.batch_size=10")
  assert "[squeeze" not in result.stdout and not os.path.exists(workdir / "config.json")


@pytest.mark.parametrize("field, value, message", [
    ("recover.iterations", 0, "recover.iterations=0: expected an integer >= 1"),
    ("seed", -1, "config.seed=-1: expected a non-negative integer"),
    ("recover.teacher_pieces", "nope=2", "'nope' is not a teacher of this recovery"),
    ("train.learning_rate", float("nan"), "train.learning_rate=nan: expected a finite number > 0"),
    ("recover.learning_rate", float("nan"), "recover.learning_rate=nan: expected a finite number > 0"),
    ("squeeze.learning_rate", float("nan"), "squeeze.learning_rate=nan: expected a positive number"),
    ("squeeze.teachers", ("resnet18", "resnet19"), "squeeze.teachers: unknown model 'resnet19'"),
])
def test_bad_values_are_refused_naming_the_field(field, value, message):
  from configs import quickstart
  config = quickstart.get_config()
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(errors.ConfigError, match=re.escape(message)):
    config_checks.validate(config)


def test_a_refused_config_leaves_nothing_that_blocks_the_corrected_run(tmp_path):
  workdir = str(tmp_path / "w")
  # A first accepted run (the diffusion stage has nothing to do in the quickstart: seconds).
  assert run_cli("configs/quickstart.py", workdir, "--config.stage=diffusion").returncode == 0
  saved = open(os.path.join(workdir, "config.json")).read()
  bad = run_cli("configs/quickstart.py", workdir, "--config.recover.iterations=0")
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1] == "prism_jax: error: recover.iterations=0: expected an integer >= 1"
  assert open(os.path.join(workdir, "config.json")).read() == saved  # the last accepted config stays
  assert sorted(os.listdir(workdir)) == ["config.json"]  # nothing else written: the corrected run starts clean


def test_unusable_work_directories_are_named(tmp_path):
  from prism_jax import main as main_module
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  with pytest.raises(errors.ArtifactError, match="is a file; expected a directory"):
    main_module._open_workdir(str(a_file))
  for url, scheme in (("s3://bucket/run", "s3"), ("foo://x", "foo")):
    with pytest.raises(errors.ConfigError, match=f"--workdir={url}: expected a local directory or a gs:// URL, "
                                                 f"not {scheme}://"):
      main_module._open_workdir(url)
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  os.chmod(read_only, 0o500)
  try:
    if not os.access(read_only, os.W_OK):  # (root may write anywhere)
      with pytest.raises(errors.ArtifactError, match="is not writable"):
        main_module._open_workdir(str(read_only))
  finally:
    os.chmod(read_only, 0o700)
  result = run_cli("configs/quickstart.py", "s3://bucket/run", "--config.stage=squeeze")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("prism_jax: error: --workdir=s3://bucket/run")


def test_expected_errors_end_in_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
  from prism_jax import main as main_module
  monkeypatch.delenv("PRISM_DEBUG", raising=False)

  def fail_with(exc):
    def fake_main(argv):
      raise exc
    monkeypatch.setattr(main_module, "main", fake_main)

  fail_with(errors.ConfigError("recover.ipc=0: expected >= 1"))
  with pytest.raises(SystemExit) as exit_info:
    main_module._run(["prism_jax.main"])
  assert exit_info.value.code == 1
  assert capsys.readouterr().err == "prism_jax: error: recover.ipc=0: expected >= 1\n"
  fail_with(ValueError("a bug: not an expected error"))
  with pytest.raises(ValueError, match="a bug"):
    main_module._run(["prism_jax.main"])


def test_importing_the_package_and_the_configs_changes_no_jax_setting_and_imports_no_jax():
  import subprocess
  code = ("import sys, jax; before = dict(jax.config.values); "
          "import prism_jax, prism_jax.methods, prism_jax.stages.distill, prism_jax.stages.train; "
          "changed = {k for k in before if jax.config.values[k] != before[k]}; assert not changed, changed")
  env = dict(os.environ, PYTHONPATH=os.path.dirname(TESTS_DIR))
  assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).returncode == 0
  code = ("import sys; import configs.quickstart, configs.imagenet_prism, configs.cifar10_compare as c; "
          "c.get_config('small'); configs.imagenet_prism.get_config('ipc10_r18'); "
          "bad = [m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'flax', 'optax', 'prism_jax.stages'))]; "
          "assert not bad, bad")
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]


def test_the_compare_config_is_one_multi_method_run():
  from configs import cifar10_compare
  c = cifar10_compare.get_config("small")
  config_checks.validate(c)
  assert c.image_sets == cifar10_compare.METHODS and c.stage == "all"
  requests = {r.name: r for r in methods.requests(c)}
  assert {n: r.method for n, r in requests.items()} == {
      m: "random_real" if m.startswith("random_real") else m for m in cifar10_compare.METHODS}
  assert [requests[m].settings.seed for m in cifar10_compare.RANDOM_SETS] == [-1, 1, 2]  # three draws
  assert c.evaluate.random_sets == cifar10_compare.RANDOM_SETS and c.diffusion.model == "T/2"
  # The hard-label table on another run's sets, and the full-data reference of HLR.
  hard = cifar10_compare.get_config("small_hard@runs/c10")
  assert hard.stage == "relabel+" and hard.train.protocol == "hard_label" and not dict(hard.methods)
  assert hard.image_sets[0] == "runs/c10/sets/random_real/distill" and hard.teachers_dir == "runs/c10/teachers"
  full = cifar10_compare.get_config("small_full")
  assert full.image_sets == ("full_real",) and full.methods.full_real.settings.ipc == 5000
  assert full.stage == "distill,train" and full.train.protocol == "hard_label"
  assert (full.train.epochs, tuple(full.train.seeds)) == (2, (0,)) and full.train.width == c.train.width
  # One protocol for all: the only per-set settings are the methods' own.
  assert requests["sre2l"].settings.init == "noise" and requests["prism"].settings.init == "real"
  assert requests["prism_intra"].settings.strategy == "intra" and c.train.protocol == "prism"
  assert cifar10_compare.get_config("small_hard").train.protocol == "hard_label"
  assert c.squeeze.max_per_class == 1000 and c.data.max_per_class == 0  # teachers on a subset only
