"""Evaluate stage: one table and one report for every image set (SPEC 8).

For each image set of this work directory (and of `evaluate.compare_workdirs`) gathers the students'
top-1 (mean ± std over seeds, best and last), measures intra- and inter-class cosine similarity of
penultimate features under one fixed reference model, collects the time each stage took, and draws
a side-by-side image grid and a UMAP plot per set. Writes `<workdir>/evaluate/`: results.json,
report.md, grid.png, umap_<set>.png.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from prism_jax.data import image_sets, sources
from prism_jax.io import artifacts, fs, teacher_store
from prism_jax.metrics import diversity, pictures, report
from prism_jax.stages import train as train_stage

STAGE_DIR = "evaluate"
COLUMNS = ("method", "images", "top1_best", "top1_last", "intra_cos", "inter_cos", "recover_s",
           "recover_img_it_s", "relabel_s", "train_s")


def _read_optional(path: str):
  return artifacts.read_json(path) if fs.exists(path) else None


def _set_sources(config, workdir: str):
  """[(label, workdir, set name)] for this run and every compared work directory."""
  out = [(name if os.sep not in name else os.path.basename(os.path.normpath(name)), workdir, name)
         for name in config.image_sets]
  for other in config.evaluate.compare_workdirs:
    other_config = _read_optional(os.path.join(other, "config.json"))
    if other_config is None:
      raise artifacts.ArtifactError(f"{other}: evaluate.compare_workdirs names a directory without config.json "
                                    "(not a prism_jax work directory)")
    for name in other_config.get("image_sets", ["recover"]):
      out.append((f"{os.path.basename(os.path.normpath(other))}/{name}", other, name))
  return out


def _stage_seconds(workdir: str, set_name: str) -> dict:
  set_path = image_sets.set_dir(workdir, set_name)
  recover = _read_optional(os.path.join(workdir, "recover", "recover.json")) if set_name == image_sets.RECOVER else None
  relabel = _read_optional(os.path.join(set_path, "relabel", "labels.json"))
  summary = _read_optional(os.path.join(set_path, "train", train_stage.SUMMARY_FILE))
  throughput = None
  manifest = os.path.join(workdir, "recover", "manifest.jsonl")
  if recover and fs.exists(manifest) and recover["wall_seconds_last_run"] > 0:
    with fs.open(manifest, "r") as f:
      image_iterations = sum(json.loads(line)["iterations"] for line in f if line.strip())
    throughput = image_iterations / recover["wall_seconds_last_run"]
  return {"recover_s": recover["wall_seconds_last_run"] if recover else None, "recover_img_it_s": throughput,
          "relabel_s": (relabel or {}).get("timing_last_run", {}).get("seconds"),
          "train_s": summary["train_seconds"] if summary else None,
          "summary": summary}


def run(config, workdir: str, mesh) -> dict:
  ev = config.evaluate
  dataset = sources.open_dataset(config.data)
  out_dir = os.path.join(workdir, STAGE_DIR)
  teachers_dir = config.relabel.teachers_dir or os.path.join(workdir, "teachers")
  ref_path = os.path.join(teachers_dir, ev.reference_model)
  model, variables, ref_meta = teacher_store.load_teacher(ref_path, expected_class_names=dataset.class_names)
  rows, per_set, grid_sets, pics = [], {}, {}, []
  for label, source_dir, name in _set_sources(config, workdir):
    image_set = image_sets.load(name, workdir=source_dir, dataset=dataset, ipc=config.recover.ipc,
                                seed=config.seed)
    features = diversity.extract_features(model, variables, image_set.images, dataset.mean, dataset.std)
    sims = diversity.cosine_similarity_stats(features, image_set.labels, dataset.num_classes)
    timing = _stage_seconds(source_dir, name)
    summary = timing.pop("summary")
    row = {"method": label, "images": image_set.num_images, "intra_cos": sims["intra_mean"],
           "inter_cos": sims["inter_mean"], **timing,
           "top1_best": _pct(summary["best_top1"]) if summary else None,
           "top1_last": _pct(summary["last_top1"]) if summary else None}
    if summary and "best_top5" in summary:
      row["top5_best"] = _pct(summary["best_top5"])
    rows.append(row)
    per_set[label] = {"row": row, "similarity": sims, "protocol": summary.get("protocol") if summary else None,
                      "train": summary}
    grid_sets[label] = (image_set.images, image_set.labels)
    if ev.umap and jax.process_index() == 0:
      safe = label.replace("/", "_")
      path = os.path.join(out_dir, f"umap_{safe}.png")
      pictures.umap_plot(features, image_set.labels, dataset.class_names, path, seed=config.seed,
                         title=f"{label}: {ev.reference_model} features")
      pics.append((f"UMAP of {label}", path))
  columns = COLUMNS + (("top5_best",) if any("top5_best" in r for r in rows) else ())
  results = {"rows": rows, "sets": per_set, "reference_model": ev.reference_model,
             "reference_test_accuracy": ref_meta.get("test_accuracy"), "dataset": dataset.fingerprint(),
             "protocol": config.train.protocol}
  if jax.process_index() == 0:
    grid = pictures.image_grid(grid_sets, dataset.class_names, os.path.join(out_dir, "grid.png"),
                               per_class=ev.grid_per_class, max_classes=ev.grid_max_classes)
    pics.insert(0, ("Images per class, methods side by side", grid))
    notes = (f"dataset {dataset.name}, {dataset.num_classes} classes, {dataset.image_size} px",
             f"protocol {config.train.protocol}: student {config.train.student}, {config.train.epochs} epochs, "
             f"seeds {list(config.train.seeds)}; top-1 on the real test split in %, mean ± std over seeds",
             f"intra_cos / inter_cos: mean pairwise cosine similarity of {ev.reference_model} penultimate "
             "features within / across classes (lower intra = more diverse)",
             "*_s: wall seconds of the stage's last run (compilation included); recover_img_it_s: recovered "
             "image-iterations per second over that run")
    report_path = os.path.join(out_dir, "report.md")
    report.write_report(report_path, f"prism_jax results: {os.path.basename(os.path.normpath(workdir))}",
                        rows, columns, pics, notes)
    results["report"] = fs.relpath(report_path, workdir)  # relative: the work directory may move
    artifacts.write_json(os.path.join(out_dir, "results.json"), results)
    print(report.format_table(rows, columns), flush=True)
    print(f"[evaluate] report: {report_path}", flush=True)
  return results


def _pct(stat: dict) -> dict:
  return {"mean": 100 * stat["mean"], "std": 100 * stat["std"]}
