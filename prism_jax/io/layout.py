"""The work-directory layout: every path a stage reads or writes, in one place.

  <workdir>/
    config.json                       the resolved config of the last accepted run
    teachers/<model>/                 squeezed or imported teachers (io/teacher_store.py); the whole
                                      directory moves with `config.teachers_dir`
    diffusion/                        the diffusion stage (model/, latents, samples.png, ckpt/)
    recover/                          the set 'recover' (the method `config.recover` describes), in
                                      the recover layout: images/<class>/ipcNNNN.png, images.npz,
                                      manifest.jsonl, classes.json, waves/ (work in progress) and
                                      its completion marker recover.json
    sets/<set>/distill/               every other set made in this run (config.methods), in the same
                                      layout, with the completion marker set.json
    sets/<set>/relabel/               soft labels of the set (relabel/store.py)
    sets/<set>/train/seed_<s>/        one student per seed (ckpt/, student.json)
    sets/<set>/train/summary.json     mean +- std over seeds
    evaluate/                         results.json, report.md, grid.png, umap_<set>.png
    tensorboard/<run>/                TensorBoard events of each stage run

A set given as a directory (another run's output) is read where it is; its relabel and train
artifacts live under sets/<basename>/ of this work directory.
"""

from __future__ import annotations

import os

CONFIG_FILE = "config.json"
RECOVER_SET = "recover"          # the set whose images live in <workdir>/recover (its historical place)
RECOVER_MARKER = "recover.json"
SET_MARKER = "set.json"
IMAGES_FILE = "images.npz"
MANIFEST_FILE = "manifest.jsonl"
STUDENT_FILE = "student.json"
SUMMARY_FILE = "summary.json"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"


def is_directory_set(name: str) -> bool:
  """A set named by a path (another run's output), not made in this run."""
  return os.sep in name or name.startswith((".", "~")) or "://" in name


def set_label(name: str) -> str:
  """A set's name in this work directory: its own name, or for a directory set the directory's name
  (for another run's `sets/<set>/distill`, that set's name)."""
  if not is_directory_set(name):
    return name
  parts = os.path.normpath(name).split(os.sep)
  return parts[-2] if parts[-1] == "distill" and len(parts) > 1 and parts[-2] else parts[-1]


def _safe(name: str) -> str:
  return set_label(name)


def config_file(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def teachers_dir(config, workdir: str) -> str:
  """Where teachers are squeezed into and read from: `config.teachers_dir`, or <workdir>/teachers."""
  return config.get("teachers_dir") or os.path.join(workdir, "teachers")


def teacher_dir(teachers_root: str, name: str) -> str:
  return os.path.join(teachers_root, name)


def diffusion_dir(workdir: str) -> str:
  return os.path.join(workdir, "diffusion")


def diffusion_model_dir(workdir: str) -> str:
  """The DiT the diffusion stage trained (a diffusion_store directory)."""
  return os.path.join(diffusion_dir(workdir), "model")


def diffusion_import_record(workdir: str) -> str:
  """The diffusion stage's record of a checked imported DiT (its directory and class map)."""
  return os.path.join(diffusion_dir(workdir), "imported.json")


def set_dir(workdir: str, name: str) -> str:
  """Where the relabel / train artifacts of set `name` live."""
  return os.path.join(workdir, "sets", _safe(name))


def distilled_dir(workdir: str, name: str) -> str:
  """Where set `name`'s images are (the recover layout)."""
  if is_directory_set(name):
    return name
  if name == RECOVER_SET:
    return os.path.join(workdir, "recover")
  return os.path.join(set_dir(workdir, name), "distill")


def distilled_marker(workdir: str, name: str) -> str:
  """The completion marker the distill stage writes last for set `name`."""
  return os.path.join(distilled_dir(workdir, name), RECOVER_MARKER if name == RECOVER_SET else SET_MARKER)


def images_file(workdir: str, name: str) -> str:
  return os.path.join(distilled_dir(workdir, name), IMAGES_FILE)


def manifest_file(workdir: str, name: str) -> str:
  return os.path.join(distilled_dir(workdir, name), MANIFEST_FILE)


def relabel_dir(workdir: str, name: str) -> str:
  return os.path.join(set_dir(workdir, name), "relabel")


def train_dir(workdir: str, name: str) -> str:
  return os.path.join(set_dir(workdir, name), "train")


def student_dir(workdir: str, name: str, seed: int) -> str:
  return os.path.join(train_dir(workdir, name), f"seed_{seed}")


def train_summary(workdir: str, name: str) -> str:
  return os.path.join(train_dir(workdir, name), SUMMARY_FILE)


def evaluate_dir(workdir: str) -> str:
  return os.path.join(workdir, "evaluate")


def tensorboard_dir(workdir: str, run: str) -> str:
  """TensorBoard events of one stage run: squeeze_<model>, diffusion, recover (the 'recover' set) or
  distill_<set>, relabel_<set>, train_<set>_seed<s>."""
  return os.path.join(workdir, "tensorboard", run)


def distill_run_name(name: str) -> str:
  return "recover" if name == RECOVER_SET else f"distill_{_safe(name)}"


def set_run_name(kind: str, name: str, suffix: str = "") -> str:
  """TensorBoard run of a stage over set `name`: relabel_<set>, train_<set>_seed<s>."""
  return f"{kind}_{_safe(name)}{suffix}"
