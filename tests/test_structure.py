"""The shape of the code that the architecture promises (README, "Architecture"): stages are wiring,
paths come from one layout module, modules do one job."""

import ast
import glob
import os

import pytest

from prism_jax.io import layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "prism_jax")


def _imports(path: str) -> set[str]:
  tree = ast.parse(open(path).read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out |= {f"{node.module}.{a.name}" for a in node.names}
  return out


def _modules(*parts: str) -> list[str]:
  return sorted(glob.glob(os.path.join(PACKAGE, *parts, "*.py")))


def test_no_stage_imports_another_stage():
  for path in _modules("stages"):
    if os.path.basename(path) == "__init__.py":
      continue  # the dispatcher imports each stage by name
    stage_imports = {m for m in _imports(path) if m.startswith("prism_jax.stages")}
    assert not stage_imports, (path, stage_imports)


def test_libraries_do_not_import_the_stage_layer_and_configs_import_no_runtime_code():
  for path in sorted(glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)):
    if os.sep + "stages" + os.sep in path or path.endswith(("main.py", "config_checks.py")):
      continue
    assert not {m for m in _imports(path) if m.startswith("prism_jax.stages")}, path
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    runtime = {m for m in _imports(path) if m.startswith("prism_jax") and not m.startswith("prism_jax.schema")}
    assert not runtime, (path, runtime)
  for path in _modules("schema"):
    assert {m.split(".")[0] for m in _imports(path)} <= {"__future__", "ml_collections", "prism_jax"}, path


def test_stages_spell_no_work_directory_path():
  """Every path under the work directory comes from io/layout.py: no stage joins a literal onto it."""
  for path in _modules("stages"):
    if os.path.basename(path) == "__init__.py":
      continue  # the dispatcher names the stages
    source = open(path).read()
    for literal in ('"tensorboard"', '"recover.json"', '"student.json"', '"summary.json"', '"labels.json"',
                    '"config.json"', 'os.path.join(workdir'):
      assert literal not in source, (path, literal)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)),
                         ids=lambda p: os.path.relpath(p, PACKAGE))
def test_modules_stay_small(path):
  assert sum(1 for _ in open(path)) <= 420, "one job per module: split it"


def test_layout_paths():
  w = "/runs/a"
  assert layout.distilled_dir(w, "recover") == "/runs/a/recover"
  assert layout.distilled_marker(w, "recover") == "/runs/a/recover/recover.json"
  assert layout.distilled_dir(w, "sre2l") == "/runs/a/sets/sre2l/distill"
  assert layout.distilled_marker(w, "sre2l") == "/runs/a/sets/sre2l/distill/set.json"
  assert layout.images_file(w, "random_real") == "/runs/a/sets/random_real/distill/images.npz"
  # Another run's output, named by its directory: read where it is, labeled under its base name.
  assert layout.is_directory_set("/runs/b/recover") and not layout.is_directory_set("random_real")
  assert layout.distilled_dir(w, "/runs/b/recover") == "/runs/b/recover"
  assert layout.relabel_dir(w, "/runs/b/recover") == "/runs/a/sets/recover/relabel"
  # Another run's method set (sets/<set>/distill) is labeled by its set's name, not 'distill'.
  assert layout.set_label("/runs/b/sets/dps/distill") == "dps" and layout.set_label("/runs/b/recover/") == "recover"
  assert layout.relabel_dir(w, "/runs/b/sets/dps/distill") == "/runs/a/sets/dps/relabel"
  assert layout.student_dir(w, "prism", 3) == "/runs/a/sets/prism/train/seed_3"
  assert layout.train_summary(w, "prism") == "/runs/a/sets/prism/train/summary.json"
  assert layout.tensorboard_dir(w, layout.set_run_name("train", "/runs/b/recover", "_seed0")) == (
      "/runs/a/tensorboard/train_recover_seed0")
  assert layout.distill_run_name("recover") == "recover" and layout.distill_run_name("dps") == "distill_dps"

  class Config(dict):
    pass
  assert layout.teachers_dir(Config(teachers_dir=""), w) == "/runs/a/teachers"
  assert layout.teachers_dir(Config(teachers_dir="gs://b/t"), w) == "gs://b/t"
  assert layout.config_file(w) == "/runs/a/config.json" and layout.evaluate_dir(w) == "/runs/a/evaluate"
