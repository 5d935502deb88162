"""Evaluate stage: one table and one report for every image set (SPEC 8).

For each image set of this work directory (and of `evaluate.compare_workdirs`) gathers the students'
top-1 (mean ± std over seeds, best and last), measures intra- and inter-class cosine similarity of
penultimate features under one fixed reference model, collects the time each stage took, and draws
a side-by-side image grid and a UMAP plot per set. Writes `<workdir>/evaluate/`: results.json,
report.md, grid.png, umap_<set>.png. A rerun whose inputs are unchanged (the sets' contents, the
students' summaries and stage times, the reference model, the evaluate and train settings), with its
files intact, prints the table again and computes nothing.
"""

from __future__ import annotations

import json
import os

import jax

from prism_jax import errors
from prism_jax.data import image_sets, sources
from prism_jax.io import artifacts, completion, fs, layout, teacher_store
from prism_jax.metrics import diversity, pictures, report
from prism_jax.relabel import store

COLUMNS = ("method", "images", "top1_best", "top1_last", "intra_cos", "inter_cos", "distill_s",
           "distill_img_it_s", "relabel_s", "train_s")


def validate(config) -> None:
  ev = config.evaluate
  if not ev.reference_model:
    raise errors.ConfigError("evaluate.reference_model is empty: expected the teacher whose features measure "
                             "diversity, e.g. 'resnet18'")
  for field in ("grid_per_class", "grid_max_classes"):
    if ev[field] < 1:
      raise errors.ConfigError(f"evaluate.{field}={ev[field]!r}: expected an integer >= 1")
  if not config.image_sets and not ev.compare_workdirs:
    raise errors.ConfigError("image_sets is empty and evaluate.compare_workdirs is empty: nothing to evaluate")


def _read_optional(path: str):
  return artifacts.read_json(path) if fs.exists(path) else None


def _set_sources(config, workdir: str):
  """[(label, workdir, set name)] for this run and every compared work directory."""
  out = [(name if os.sep not in name else os.path.basename(os.path.normpath(name)), workdir, name)
         for name in config.image_sets]
  for other in config.evaluate.compare_workdirs:
    other_config = _read_optional(layout.config_file(other))
    if other_config is None:
      raise artifacts.ArtifactError(f"{other}: evaluate.compare_workdirs names a directory without config.json "
                                    "(not a prism_jax work directory)")
    for name in other_config.get("image_sets", ["recover"]):
      out.append((f"{os.path.basename(os.path.normpath(other))}/{name}", other, name))
  return out


def _stage_seconds(workdir: str, set_name: str) -> dict:
  """Wall seconds of the last run of each stage over the set (None where this run did not make it)."""
  marker = None if layout.is_directory_set(set_name) else _read_optional(layout.distilled_marker(workdir, set_name))
  relabel = _read_optional(os.path.join(layout.relabel_dir(workdir, set_name), store.INDEX_FILE))
  summary = _read_optional(layout.train_summary(workdir, set_name))
  seconds = (marker or {}).get("wall_seconds_last_run")
  throughput = None
  manifest = layout.manifest_file(workdir, set_name)
  if seconds and fs.exists(manifest):
    with fs.open(manifest, "r") as f:
      records = [json.loads(line) for line in f if line.strip()]
    if records and all("iterations" in r for r in records):  # iterative methods: image-iterations / s
      throughput = sum(r["iterations"] for r in records) / seconds
  return {"distill_s": seconds, "distill_img_it_s": throughput,
          "relabel_s": (relabel or {}).get("timing_last_run", {}).get("seconds"),
          "train_s": summary["train_seconds"] if summary else None,
          "summary": summary}


def run(config, workdir: str, mesh) -> dict:
  validate(config)
  ev = config.evaluate
  dataset = sources.open_dataset(config.data)
  out_dir = layout.evaluate_dir(workdir)
  reference = teacher_store.load_teacher_set((ev.reference_model,), layout.teachers_dir(config, workdir),
                                             class_names=dataset.class_names, needed_by="evaluate.reference_model")
  model, variables, ref_meta = reference.models[0], reference.variables[0], reference.metas[0]
  sets = [(label, image_sets.load(name, workdir=source_dir, dataset=dataset), _stage_seconds(source_dir, name))
          for label, source_dir, name in _set_sources(config, workdir)]
  tr = config.train
  fp = {"sets": [{"label": label, "set": image_set.fingerprint(), "stages": timing}
                 for label, image_set, timing in sets],
        "reference": ref_meta.get("variables_sha256"), "evaluate": ev.to_dict(), "data": dataset.fingerprint(),
        "train": {"protocol": tr.protocol, "student": tr.student, "epochs": tr.epochs, "seeds": list(tr.seeds)}}
  results_path = os.path.join(out_dir, layout.RESULTS_FILE)
  done = _unchanged(results_path, fp)
  if done is not None:  # the same sets, students and settings: the report stands
    print(report.format_table(done["rows"], done["columns"]), flush=True)
    print(f"[evaluate] already done (inputs unchanged): report {os.path.join(out_dir, layout.REPORT_FILE)}", flush=True)
    return done
  rows, per_set, grid_sets, pics = [], {}, {}, []
  for label, image_set, timing in sets:
    features = diversity.extract_features(model, variables, image_set.images, dataset.mean, dataset.std)
    sims = diversity.cosine_similarity_stats(features, image_set.labels, dataset.num_classes)
    timing = dict(timing)
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
  results = {"rows": rows, "columns": list(columns), "sets": per_set, "reference_model": ev.reference_model,
             "reference_test_accuracy": ref_meta.get("test_accuracy"), "dataset": dataset.fingerprint(),
             "protocol": config.train.protocol, "fingerprint": fp}
  if jax.process_index() == 0:
    grid = pictures.image_grid(grid_sets, dataset.class_names, os.path.join(out_dir, "grid.png"),
                               per_class=ev.grid_per_class, max_classes=ev.grid_max_classes)
    pics.insert(0, ("Images per class, methods side by side", grid))
    notes = (f"dataset {dataset.name}, {dataset.num_classes} classes, {dataset.image_size} px",
             f"protocol {config.train.protocol}: student {config.train.student}, {config.train.epochs} epochs, "
             f"seeds {list(config.train.seeds)}; top-1 on the real test split in %, mean ± std over seeds",
             f"intra_cos / inter_cos: mean pairwise cosine similarity of {ev.reference_model} penultimate "
             "features within / across classes (lower intra = more diverse); – where undefined (intra_cos "
             "needs two images of a class: at IPC 1 there are no pairs)",
             "*_s: wall seconds of the stage's last run (compilation included); distill_s: making the set; "
             "distill_img_it_s: image-iterations per second of iterative methods (recover) over that run")
    report_path = os.path.join(out_dir, layout.REPORT_FILE)
    report.write_report(report_path, f"prism_jax results: {os.path.basename(os.path.normpath(workdir))}",
                        rows, columns, pics, notes)
    results["report"] = fs.relpath(report_path, workdir)  # relative: the work directory may move
    results["files"] = completion.record_files(out_dir, sorted(
        n for n in fs.listdir(out_dir) if n != layout.RESULTS_FILE and not n.startswith(".")))
    artifacts.write_json(results_path, results)
    print(report.format_table(rows, columns), flush=True)
    print(f"[evaluate] report: {report_path}", flush=True)
  return results


def _unchanged(results_path: str, fp: dict) -> dict | None:
  """The last results when they were made from the same inputs and their files are intact (process 0
  decides for all)."""
  from prism_jax.parallel import multihost
  found = None
  if multihost.is_main_process() and fs.exists(results_path):
    found = artifacts.read_json(results_path)
    same = (not artifacts.diff_fields(fp, found.get("fingerprint", {})) and "columns" in found and
            completion.damaged_file(os.path.dirname(results_path), found.get("files", {})) is None)
    found = found if same else None
  if not multihost.broadcast_from_main(found is not None):
    return None
  return found or artifacts.read_json(results_path)


def _pct(stat: dict) -> dict:
  return {"mean": 100 * stat["mean"], "std": 100 * stat["std"]}
