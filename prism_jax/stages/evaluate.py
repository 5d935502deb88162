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
import numpy as np

from prism_jax import errors
from prism_jax.data import image_sets, sources
from prism_jax.diffusion import prior
from prism_jax.io import artifacts, completion, diffusion_store, fs, layout, teacher_store
from prism_jax.metrics import diversity, method_figures, pictures, ranking, report
from prism_jax.relabel import store

COLUMNS = ("method", "images", "top1_best", "top1_last", "intra_cos", "inter_cos", "distill_s",
           "distill_img_it_s", "relabel_s", "train_s")
RANKING_COLUMNS = ("ior", "hlr", "lrs")
DIFFUSION_METHODS = ("dps", "dit", "dap")  # their sets stand on the diffusion stage's DiT (diffusion_s)  # DD-Ranking (metrics/ranking.py), where they can be computed


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
  if not 0 <= ev.lrs_weight <= 1:
    raise errors.ConfigError(f"evaluate.lrs_weight={ev.lrs_weight!r}: expected a value in [0, 1]")
  if ev.full_data_top1 != -1 and not 0 <= ev.full_data_top1 <= 100:
    raise errors.ConfigError(f"evaluate.full_data_top1={ev.full_data_top1!r}: expected -1 (unknown) or a top-1 in %")


def _read_optional(path: str):
  return artifacts.read_json(path) if fs.exists(path) else None


def _set_sources(config, workdir: str):
  """[(label, workdir, set name)] for this run and every compared work directory."""
  out = [(layout.set_label(name), workdir, name) for name in config.image_sets]
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
  diffusion = None
  if (marker or {}).get("method") in DIFFUSION_METHODS:
    try:
      model_dir, _ = prior.resolve_model(workdir)
      timing = diffusion_store.load_meta(model_dir).get("timing_last_run") or {}
      diffusion = timing.get("seconds_total", timing.get("wall_seconds"))  # every run, or (older) the last
    except artifacts.ArtifactError:
      diffusion = None
  return {"distill_s": seconds, "distill_img_it_s": throughput, "diffusion_s": diffusion,
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
  if ev.hard_label_workdir:  # its results decide HLR and LRS
    fp["hard_label"] = _hard_label_top1(ev.hard_label_workdir)
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
  if any(r.get("diffusion_s") for r in rows):
    columns += ("diffusion_s",)
  columns += _add_ranking(rows, ev)
  results = {"rows": rows, "columns": list(columns), "sets": per_set, "reference_model": ev.reference_model,
             "reference_test_accuracy": ref_meta.get("test_accuracy"), "dataset": dataset.fingerprint(),
             "protocol": config.train.protocol, "fingerprint": fp}
  if jax.process_index() == 0:
    grid = pictures.image_grid(grid_sets, dataset.class_names, os.path.join(out_dir, "grid.png"),
                               per_class=ev.grid_per_class, max_classes=ev.grid_max_classes)
    pics.insert(0, ("Images per class, methods side by side", grid))
    pics += _method_figures(sets, out_dir, dataset, ev)
    notes = (f"dataset {dataset.name}, {dataset.num_classes} classes, {dataset.image_size} px",
             f"protocol {config.train.protocol}: student {config.train.student}, {config.train.epochs} epochs, "
             f"seeds {list(config.train.seeds)}; top-1 on the real test split in %, mean ± std over seeds",
             f"intra_cos / inter_cos: mean pairwise cosine similarity of {ev.reference_model} penultimate "
             "features within / across classes (lower intra = more diverse); – where undefined (intra_cos "
             "needs two images of a class: at IPC 1 there are no pairs)",
             "*_s: wall seconds of the stage's last run (compilation included); distill_s: making the set; "
             "distill_img_it_s: image-iterations per second of iterative methods (recover) over that run; "
             "diffusion_s: training the DiT that dps / dit / dap sets stand on (once for all of them)",
             f"ior: top-1 minus the mean of the random-real sets {list(ev.random_sets)} (± their spread over "
             "seeds: an IOR inside it is no difference); hlr: evaluate.full_data_top1 minus the set's top-1 "
             "under hard labels (evaluate.hard_label_workdir); lrs: DD-Ranking's label-robust score, "
             f"w = {ev.lrs_weight} (metrics/ranking.py)")
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


def _manifest(image_set) -> list:
  """The set's manifest records ([] for a set without one, e.g. drawn in memory)."""
  path = os.path.join(os.path.dirname(image_set.origin), layout.MANIFEST_FILE)
  if not image_set.origin.endswith(layout.IMAGES_FILE) or not fs.exists(path):
    return []
  with fs.open(path, "r") as f:
    return [json.loads(line) for line in f if line.strip()]


def _ipc_index(image_set) -> np.ndarray:
  with fs.open(image_set.origin, "rb") as f, np.load(f, allow_pickle=False) as z:
    return z["ipc_index"]


def _method_figures(sets, out_dir: str, dataset, ev) -> list:
  """DPS's picks per cluster and DAP next to dit (same starting noise), for the sets that have them."""
  by_method = {}
  for label, image_set, _ in sets:
    records = _manifest(image_set)
    if records and "method" in records[0]:
      by_method.setdefault(records[0]["method"], (label, image_set, records))
  out = []
  if "dps" in by_method:
    label, image_set, records = by_method["dps"]
    path = os.path.join(out_dir, "dps_clusters.png")
    method_figures.dps_cluster_figure(image_set.images, image_set.labels, _ipc_index(image_set), records,
                                      dataset.class_names, path, max_classes=ev.grid_max_classes)
    out.append((f"{label}: the crops DPS picked, per cluster (best-ranked first)", path))
  if "dit" in by_method and "dap" in by_method and method_figures.same_start(by_method["dit"][2], by_method["dap"][2]):
    (dit_label, dit_set, _), (dap_label, dap_set, _) = by_method["dit"], by_method["dap"]
    path = os.path.join(out_dir, "dap_guidance.png")
    method_figures.dap_guidance_figure(dit_set.images, dit_set.labels, dap_set.images, dap_set.labels,
                                       dataset.class_names, path, per_class=ev.grid_per_class,
                                       max_classes=ev.grid_max_classes)
    out.append((f"{dit_label} vs {dap_label}: the same starting noise without and with guidance", path))
  return out


def _hard_label_top1(hard_workdir: str) -> dict:
  """Each set's mean best top-1 (%) in another work directory that trained the same sets under the
  hard-label protocol (its evaluate/results.json)."""
  path = os.path.join(layout.evaluate_dir(hard_workdir), layout.RESULTS_FILE)
  found = _read_optional(path)
  if found is None:
    raise artifacts.ArtifactError(f"{path}: evaluate.hard_label_workdir names a directory without evaluate "
                                  "results; run its evaluate stage first")
  if found.get("protocol") != "hard_label":
    raise artifacts.ArtifactError(f"{path}: trained under the '{found.get('protocol')}' protocol; "
                                  "evaluate.hard_label_workdir must be a hard_label run")
  return {r["method"]: (r.get("top1_best") or {}).get("mean") for r in found["rows"]}


def _add_ranking(rows: list, ev) -> tuple:
  """Adds DD-Ranking's IOR, HLR and LRS to the rows where they can be computed; returns the columns."""
  top1 = {r["method"]: (r.get("top1_best") or {}).get("mean") for r in rows}
  randoms = [label for label in ev.random_sets if label in top1]
  if not randoms:
    return ()
  hard = _hard_label_top1(ev.hard_label_workdir) if ev.hard_label_workdir else None
  full = None if ev.full_data_top1 == -1 else float(ev.full_data_top1)
  values = ranking.columns(top1, random_sets=randoms, hard_top1=hard, full_top1=full, weight=ev.lrs_weight)
  for row in rows:
    row.update(values[row["method"]])
  return RANKING_COLUMNS if hard is not None and full is not None else ("ior",)


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
