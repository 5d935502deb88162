"""What only an accelerator can show, measured in one short run (`benchmarks/device_check.sh`).

  python benchmarks/device_check.py --out bench_out/device_check.json [--data DIR] [--budget-s 540]
  python benchmarks/device_check.py --smoke        # the same code paths on CPU, tiny, about a minute

Parts (each prints a table; all rows go to the JSON):
  recover   one PRISM recovery wave at 224 px, 100 images per recovery batch, K = 1..4 BN teachers
            (ResNet-18 + MobileNetV2 + EfficientNet-B0 + ShuffleNetV2-0.5, imagenet stem, random
            weights), `cond` and `static` teacher gating: image-iterations/s (compile excluded),
            peak device memory from `device.memory_stats()` (the process's running peak, so rows
            are in increasing-memory order) next to XLA's compiled estimate, and model-FLOP
            utilization = XLA cost-analysis FLOPs / wall time / the device's peak FLOP/s.
  train     supervised ResNet-18 training steps/s at 224 px, batch 256 (AdamW, BN over the batch),
            float32 against the bfloat16 precision policy (float32 parameters, BN statistics and
            optimizer state).
  quality   in the time left: CIFAR-10 PRISM against random real images under the `prism`
            protocol at IPC 10 and 50, with teachers trained here (full-width small-stem
            ResNet-18, MobileNetV2, EfficientNet-B0, ShuffleNetV2-0.5, AlexNet) on the CIFAR-10
            subset in --data (prepared by benchmarks/prepare_device_check.py: 10,000 training and
            2,000 test images, class-balanced). Rows that do not fit in --budget-s are skipped and
            listed as such.
The device machines have no TensorFlow, TFDS or clu; this script and the stages it drives need none
of them (ml_collections is carried as a wheel, see device_check.sh).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax

from prism_jax import runtime  # noqa: E402

runtime.configure_jax()
import jax.numpy as jnp
import numpy as np

# Dense peak FLOP/s by device kind: (float32 without tensor cores, bfloat16 tensor cores).
PEAK_FLOPS = {
    "H200": (67e12, 989e12), "H100": (67e12, 989e12), "A100": (19.5e12, 312e12),
    "L4": (30e12, 121e12), "TPU v4": (275e12, 275e12), "TPU v5 lite": (197e12, 197e12),
    "TPU v5": (459e12, 459e12), "TPU v6 lite": (918e12, 918e12),
}
TEACHERS_224 = ("resnet18", "mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5")


def peak_flops(device, override_tflops: float, dtype: str) -> float | None:
  if override_tflops > 0:
    return override_tflops * 1e12
  kind = getattr(device, "device_kind", "")
  for name, (f32, bf16) in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return f32 if dtype == "float32" else bf16
  return None


def memory_stats(device) -> dict:
  try:
    stats = device.memory_stats() or {}
  except Exception:  # CPU devices have none
    stats = {}
  return {"peak_bytes_in_use": stats.get("peak_bytes_in_use"), "bytes_in_use": stats.get("bytes_in_use")}


def part_recover(args, settings) -> list[dict]:
  import recover as recover_bench  # benchmarks/recover.py: the wave program as the stage builds it
  from prism_jax.train import precision
  from configs import common

  size, batch, iters = settings["size"], settings["batch"], settings["iters"]
  stem = "imagenet" if size >= 128 else "small"
  device = jax.devices()[0]
  policy = precision.resolve(common.base_config(), "recover")
  peak = peak_flops(device, args.peak_tflops, "float32")
  names_all = TEACHERS_224[:settings["max_k"]]
  teachers_all = recover_bench.build_teachers(names_all, stem, settings["width"], size, 1000)
  rows = []
  print(f"recover: {size} px, {batch} images per batch, {iters} timed iterations, {policy.describe()}", flush=True)
  for k in range(1, len(names_all) + 1):
    names = names_all[:k]
    static = None
    for gating in ("cond", "static"):
      with policy.scope():
        fn, state, fargs, v, m, cfg = recover_bench.lower(teachers_all[:k], names, size, batch, iters + 1, {0},
                                                          set(range(k)))
        # FLOPs from the static programs (no loop or conditional for the cost model to guess; the
        # same for both gatings); XLA's memory estimate of the program(s) this gating runs (static:
        # the largest of them).
        if static is None:
          static = recover_bench.static_cost(state, fargs, v, m, cfg, tuple(range(k)))
        flops_per_iteration = static["flops"]
        if gating == "cond":
          estimate = fn.lower(state, *fargs, v, np.int32(0), np.int32(1), models=m, cfg=cfg).compile().memory_analysis()
          temp_bytes, argument_bytes = estimate.temp_size_in_bytes, estimate.argument_size_in_bytes
        else:
          temp_bytes, argument_bytes = static["temp_bytes"], static["argument_bytes"]
        t0 = time.perf_counter()
        state = recover_bench.run_steps(fn, state, fargs, v, m, cfg, 0, 1, gating)
        jax.block_until_ready(state)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        state = recover_bench.run_steps(fn, state, fargs, v, m, cfg, 1, iters + 1, gating)
        jax.block_until_ready(state)
        seconds = time.perf_counter() - t0
      achieved = flops_per_iteration * iters / seconds
      row = {"K": k, "teachers": list(names), "gating": gating, "px": size, "images": batch,
             "iterations": iters, "seconds": seconds, "image_iterations_per_s": batch * iters / seconds,
             "compile_s": compile_s, "flops_per_iteration": flops_per_iteration,
             "achieved_tflops": achieved / 1e12, "mfu": achieved / peak if peak else None,
             "xla_temp_bytes": temp_bytes, "xla_argument_bytes": argument_bytes, **memory_stats(device)}
      rows.append(row)
      mfu = f"{100 * row['mfu']:5.1f}%" if row["mfu"] is not None else "  n/a"
      peak_mem = row["peak_bytes_in_use"]
      print(f"  K={k} {gating:6} {row['image_iterations_per_s']:9.1f} img-it/s  {row['achieved_tflops']:7.2f} TFLOP/s "
            f"MFU {mfu}  XLA temp {temp_bytes / 2**30:6.2f} GiB  peak "
            f"{'n/a' if peak_mem is None else f'{peak_mem / 2**30:.2f} GiB'}  (compile {compile_s:.1f}s)", flush=True)
  return rows


def part_train(args, settings) -> list[dict]:
  from prism_jax import models
  from prism_jax.train import optim, state as state_lib, steps

  size, batch, timed = settings["size"], settings["batch"], settings["steps"]
  stem = "imagenet" if size >= 128 else "small"
  device = jax.devices()[0]
  rows = []
  print(f"train: resnet18 {size} px, batch {batch}, {timed} timed steps", flush=True)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
  labels = jnp.asarray(rng.integers(0, 1000, (batch,)), jnp.int32)
  for dtype_name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
    model = models.create_model("resnet18", num_classes=1000, stem=stem, width=settings["width"], dtype=dtype)
    tx = optim.make_optimizer("adamw", 1e-3, weight_decay=0.01, momentum=0.9)
    state = jax.jit(functools.partial(state_lib.create_train_state, model, tx, image_shape=(size, size, 3)))(
        jax.random.key(0))
    step = jax.jit(functools.partial(steps.classification_train_step, mean=(0.485, 0.456, 0.406),
                                     std=(0.229, 0.224, 0.225)), donate_argnums=0)
    compiled = step.lower(state, images, labels, jax.random.key(0)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan")))
    t0 = time.perf_counter()
    state, metrics = step(state, images, labels, jax.random.key(0))
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(timed):
      state, metrics = step(state, images, labels, jax.random.key(i + 1))
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - t0
    peak = peak_flops(device, args.peak_tflops, dtype_name)
    achieved = flops * timed / seconds
    param_dtypes = sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(state.params)})
    rows.append({"compute_dtype": dtype_name, "px": size, "batch": batch, "steps": timed,
                 "steps_per_s": timed / seconds, "images_per_s": timed * batch / seconds, "compile_s": compile_s,
                 "flops_per_step": flops, "achieved_tflops": achieved / 1e12,
                 "mfu": achieved / peak if peak else None, "param_dtypes": param_dtypes,
                 "final_loss": float(metrics["loss"]), **memory_stats(device)})
    mfu = f"{100 * rows[-1]['mfu']:5.1f}%" if rows[-1]["mfu"] is not None else "  n/a"
    print(f"  {dtype_name:8} {timed / seconds:7.2f} steps/s  {timed * batch / seconds:9.1f} img/s  "
          f"{achieved / 1e12:7.2f} TFLOP/s MFU {mfu}  params {param_dtypes}  (compile {compile_s:.1f}s)", flush=True)
  return rows


def _tiny_arrays(directory: str, per_class: int = 16, size: int = 16) -> str:
  """A small 10-class array dataset for --smoke (structured, so teachers learn something)."""
  rng = np.random.default_rng(0)
  os.makedirs(directory, exist_ok=True)
  for split, n in (("train", per_class), ("test", 4)):
    labels = np.repeat(np.arange(10), n)
    base = np.linspace(20, 235, 10)[labels][:, None, None, None]
    images = np.clip(rng.normal(base, 30, (len(labels), size, size, 3)), 0, 255).astype(np.uint8)
    np.savez(os.path.join(directory, f"{split}.npz"), images=images, labels=labels,
             class_names=np.array([f"c{i}" for i in range(10)]))
  return directory


def part_quality(args, settings, deadline: float) -> list[dict]:
  """PRISM vs random_real per IPC with the multi-method config of configs/cifar10_compare.py (the
  CPU quality benchmark's run) at this budget: teachers squeezed once, then per IPC one work directory
  whose distill stage makes both sets."""
  from configs import cifar10_compare
  from prism_jax.parallel import mesh as mesh_lib
  from prism_jax.stages import run_stage

  budget = settings["budget"]
  cache = args.cache or tempfile.mkdtemp(prefix="prism_device_check_")
  mesh = mesh_lib.make_mesh(args.devices)
  teachers = settings.get("teachers", cifar10_compare.TEACHERS)
  methods = ("random_real", "prism")

  def make(ipc: int):
    config = cifar10_compare.make_config(budget, ipc=ipc, methods=methods, data_path=os.path.abspath(args.data),
                                         teachers=teachers)
    config.teachers_dir = os.path.join(cache, "teachers")
    config.recover.units_per_device = settings["units_per_device"]
    if "student_batch" in settings:  # --smoke: a batch that fits the tiny sets; same code paths
      config.train.batch_size, config.train.accumulation = settings["student_batch"], 1
    return config

  t0 = time.perf_counter()
  teacher_acc = run_stage("squeeze", make(settings["ipcs"][0]), cache, mesh)
  squeeze_s = time.perf_counter() - t0
  print("quality: teachers " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in teacher_acc.items()) +
        f" ({squeeze_s:.0f} s)", flush=True)
  rows = []
  for ipc in settings["ipcs"]:
    if time.perf_counter() > deadline:
      rows += [{"ipc": ipc, "method": m, "skipped": "out of time"} for m in methods]
      print(f"  IPC {ipc:3d} skipped: out of time", flush=True)
      continue
    results = run_stage("distill,relabel,train", make(ipc), os.path.join(cache, f"ipc{ipc}"), mesh)
    for method in methods:
      summary, made = results["train"][method], results["distill"][method]
      times = {"distill_s": made["wall_seconds_last_run"],
               "relabel_s": results["relabel"][method].get("timing_last_run", {}).get("seconds"),
               "train_s": summary["train_seconds"]}
      rows.append({"ipc": ipc, "method": method, **times, "top1_best": summary["best_top1"],
                   "top1_last": summary["last_top1"]})
      print(f"  IPC {ipc:3d} {method:12} student top-1 best {100 * summary['best_top1']['mean']:6.2f}%  last "
            f"{100 * summary['last_top1']['mean']:6.2f}%  ({', '.join(f'{k} {v:.0f}' for k, v in times.items())})",
            flush=True)
  return [{"teacher_test_top1": teacher_acc, "squeeze_s": squeeze_s, "data": args.data}] + rows


SETTINGS = {
    "full": {"recover": dict(size=224, batch=100, iters=10, width=1.0, max_k=4),
             "train": dict(size=224, batch=256, steps=20, width=1.0),
             "quality": dict(ipcs=(10, 50), units_per_device=10, budget=dict(
                 teacher_width=1.0, max_per_class=1000, teacher_epochs=15, iterations=500, iteration_step=60,
                 student_width=1.0, student_epochs=300, eval_every=50, seeds=(0,)))},
    "smoke": {"recover": dict(size=32, batch=2, iters=2, width=0.125, max_k=1),
              "train": dict(size=16, batch=8, steps=2, width=0.125),
              "quality": dict(ipcs=(1,), units_per_device=1, teachers=("resnet18", "alexnet"), student_batch=10,
                              budget=dict(
                  teacher_width=0.125, max_per_class=16, teacher_epochs=1, iterations=4, iteration_step=1,
                  student_width=0.125, student_epochs=2, eval_every=1, seeds=(0,)))},
}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true", help="tiny sizes on any backend (the test suite runs this)")
  parser.add_argument("--parts", default="recover,train,quality")
  parser.add_argument("--data", default="", help="CIFAR-10 subset (train.npz / test.npz); --smoke makes its own")
  parser.add_argument("--cache", default="", help="work directories of the quality part (default: a temp dir)")
  parser.add_argument("--budget-s", type=float, default=540.0, help="quality rows start only before this")
  parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (default: by device kind)")
  parser.add_argument("--devices", type=int, default=-1, help="devices of the quality part (-1: all)")
  parser.add_argument("--out", default="bench_out/device_check.json")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  settings = SETTINGS["smoke" if args.smoke else "full"]
  parts = [p for p in args.parts.split(",") if p]
  unknown = sorted(set(parts) - {"recover", "train", "quality"})
  if unknown:
    parser.error(f"--parts: unknown {unknown}")
  if "quality" in parts and not args.data:
    if not args.smoke:
      parser.error("--data: the quality part needs the CIFAR-10 subset (benchmarks/prepare_device_check.py)")
    args.data = _tiny_arrays(tempfile.mkdtemp(prefix="prism_device_check_data_"))
  device = jax.devices()[0]
  result = {"benchmark": "device_check", "smoke": args.smoke, "backend": jax.default_backend(),
            "device_kind": getattr(device, "device_kind", str(device)), "devices": jax.device_count(),
            "jax": jax.__version__}
  print(f"device_check on {jax.device_count()} x {result['device_kind']} ({result['backend']}), jax {jax.__version__}",
        flush=True)
  if "recover" in parts:
    result["recover"] = part_recover(args, settings["recover"])
  if "train" in parts:
    result["train"] = part_train(args, settings["train"])
  if "quality" in parts:
    result["quality"] = part_quality(args, settings["quality"], start + args.budget_s)
  result["wall_s"] = time.perf_counter() - start
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  from prism_jax.io import artifacts
  artifacts.write_json(args.out, artifacts.to_jsonable(result))
  print(f"wrote {args.out} ({result['wall_s']:.0f} s)", flush=True)
  return result


if __name__ == "__main__":
  main()
