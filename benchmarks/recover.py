"""Recover benchmark: throughput, peak memory, FLOPs per step and useful-work fraction.

  python benchmarks/recover.py --out bench_out/recover.json            # everything
  python benchmarks/recover.py --parts memory --out bench_out/mem.json   # only the memory table

Parts:
  throughput  recovered image-iterations per second of the wave program (steady state, compile
              excluded) for SRe2L-like (1 teacher) and PRISM (ResNet-18 + 0..3 extra BN teachers),
              at 32 px (small-stem teachers) and at 224 px (imagenet stem, small batch), for each
              teacher gating (CPU: host-driven 'static' and device-loop 'cond').
  memory      peak temporary memory from XLA's compiled memory analysis (compile only, nothing
              runs) of the device-loop program (`teacher_gating='cond'`, the accelerator path)
              for K = 1..4 BN teachers (ResNet-18 + MobileNetV2 + EfficientNet-B0 +
              ShuffleNetV2-0.5) at 224 px with 100 images per recovery batch: teachers one at a
              time with remat and EfficientNet-B0 in 2 pieces (the ImageNet preset), without the
              pieces, without remat, and all teachers at once (`sequential_teachers=False`).
  flops       FLOPs per iteration from XLA's cost analysis: PRISM's shared ResNet-18 (logits + BN
              from one forward) against the same objective with the logit and BN terms computed by
              two separate ResNet-18 forwards.
  schedule    useful-work fraction and device occupancy of the wave scheduler for PRISM
              (bernoulli, pre, per-IPC draws) on 1 and 8 devices, 1 and 4 vmapped units per device.
Teachers have random weights: speed and memory do not depend on the values.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from prism_jax import models, runtime
from prism_jax.parallel import mesh as mesh_lib
from prism_jax.recover import engine, schedule, selection

EXTRAS = ("mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5")


def build_teachers(names, stem, width, size, num_classes):
  out = []
  for i, name in enumerate(names):
    model = models.create_model(name, num_classes=num_classes, stem=stem, width=width)
    variables = jax.jit(lambda k, model=model: model.init(
        {"params": k, "dropout": k}, jnp.zeros((1, size, size, 3)), train=False))(jax.random.key(i))
    out.append((model, variables))
  return out


def wave_inputs(width, classes, size, iterations, teacher_names, ce_names, bn_names):
  n = len(teacher_names)
  ce = np.zeros((width, iterations, n), np.float32)
  bn = np.zeros((width, iterations, n), np.float32)
  for k, name in enumerate(teacher_names):
    ce[:, :, k] = 1.0 if k in ce_names else 0.0
    bn[:, :, k] = 0.01 / len(bn_names) if k in bn_names else 0.0
  images = jax.random.normal(jax.random.key(0), (width, classes, size, size, 3))
  state = engine.init_state(images)
  keys = jax.random.key_data(jax.random.split(jax.random.key(1), width))
  labels = jnp.tile(jnp.arange(classes, dtype=jnp.int32)[None], (width, 1)) % 10
  totals = jnp.full((width,), iterations, jnp.int32)
  return state, (keys, labels, totals, jnp.asarray(ce), jnp.asarray(bn))


def lower(teachers, names, size, classes, iterations, ce_names, bn_names, sequential=True, width=1,
          remat=True, pieces=()):
  state, args = wave_inputs(width, classes, size, iterations, names, ce_names, bn_names)
  cfg = engine.StepConfig(tuple(names), size, (-2.2,) * 3, (2.7,) * 3, 0.05, 10.0,
                          max(1, round(32 * size / 224)), sequential_teachers=sequential, remat=remat,
                          teacher_pieces=tuple(pieces))
  mesh = mesh_lib.make_mesh(1)
  # Inputs placed as the stage places them, so the first call compiles the program for good.
  put = lambda x: jax.device_put(x, mesh_lib.data_sharding(mesh))
  state = {k: put(x) for k, x in state.items()}
  args = tuple(put(x) for x in args)
  fn = jax.jit(functools.partial(engine.run_iterations, mesh=mesh),
               static_argnames=("models", "cfg"), donate_argnums=(0,))
  m = tuple(t[0] for t in teachers)
  v = mesh_lib.replicate(tuple(t[1] for t in teachers), mesh)
  return fn, state, args, v, m, cfg


def run_steps(fn, state, fargs, v, m, cfg, start, stop, gating):
  """Iterations [start, stop) as the recover stage runs them with this teacher gating (`fn` from
  `lower`: the one-program loop of `cond` gating; static gating runs `engine.static_iteration`)."""
  if gating == "cond":
    return fn(state, *fargs, v, np.int32(start), np.int32(stop), models=m, cfg=cfg)
  active = tuple(range(len(m)))
  for t in range(start, stop):
    state = engine.static_iteration(state, *fargs, v, np.int32(t), models=m, cfg=cfg, mesh=mesh_lib.make_mesh(1),
                                    active=active)
  return state


def static_cost(state, fargs, v, m, cfg, active) -> dict:
  """XLA's cost and memory analysis of one static-gating iteration (every teacher in `active`):
  FLOPs summed over its programs (none has a loop or a conditional for the cost model to guess),
  the largest program's temporary memory and its arguments."""
  flops, temp, arguments = 0.0, 0, 0
  for lowered in engine.static_lowered(state, *fargs, v, np.int32(0), models=m, cfg=cfg, mesh=mesh_lib.make_mesh(1),
                                       active=active):
    compiled = lowered.compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops += float(cost.get("flops", float("nan")))
    mem = compiled.memory_analysis()
    if mem.temp_size_in_bytes >= temp:
      temp, arguments = mem.temp_size_in_bytes, mem.argument_size_in_bytes
  return {"flops": flops, "temp_bytes": temp, "argument_bytes": arguments}


def part_throughput(args):
  rows = []
  gatings = args.gatings.split(",") if args.gatings else (
      ["static", "cond"] if jax.default_backend() == "cpu" else ["cond"])
  for size, stem, width, classes, iters in ((32, "small", args.width32, 10, args.iters32),
                                            (224, "imagenet", 1.0, args.batch224, args.iters224)):
    for k_extra in range(0, 4):
      names = ("resnet18",) + EXTRAS[:k_extra]
      teachers = build_teachers(names, stem, width, size, 10 if size == 32 else 1000)
      for gating in gatings:
        fn, state, fargs, v, m, cfg = lower(teachers, names, size, classes, iters + 1, {0},
                                            set(range(len(names))))
        t0 = time.perf_counter()
        state = run_steps(fn, state, fargs, v, m, cfg, 0, 1, gating)
        jax.block_until_ready(state)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        state = run_steps(fn, state, fargs, v, m, cfg, 1, iters + 1, gating)
        jax.block_until_ready(state)
        secs = time.perf_counter() - t0
        label = "SRe2L-like (1 teacher)" if k_extra == 0 else f"PRISM R18 + {k_extra} extra"
        rows.append({"setting": label, "px": size, "stem": stem, "width": width, "images": classes,
                     "teachers": list(names), "gating": gating, "iterations": iters, "seconds": secs,
                     "image_iterations_per_s": classes * iters / secs, "compile_s": compile_s})
        print(f"  {label:24} {size:4d}px w{width:<5g} {classes:3d} img  {gating:6} "
              f"{classes * iters / secs:9.1f} img-it/s  (compile {compile_s:.1f}s)", flush=True)
  return rows


MEMORY_VARIANTS = (  # (label, sequential_teachers, remat, EfficientNet-B0 pieces)
    ("sequential + remat + EfficientNet in 2 pieces (ImageNet preset)", True, True, 2),
    ("sequential + remat", True, True, 1),
    ("sequential, no remat", True, False, 1),
    ("all teachers at once (naive)", False, False, 1),
)


def part_memory(args):
  rows = []
  size, classes = args.mem_size, args.mem_batch
  names_all = ("resnet18",) + EXTRAS
  teachers_all = build_teachers(names_all, "imagenet", 1.0, size, 1000)
  chosen = [int(i) for i in args.mem_variants.split(",")] if args.mem_variants else range(len(MEMORY_VARIANTS))
  for label, sequential, remat, effnet_pieces in (MEMORY_VARIANTS[i] for i in chosen):
    for k in range(1, 5):
      names = names_all[:k]
      pieces = tuple(effnet_pieces if n == "efficientnet_b0" else 1 for n in names)
      fn, state, fargs, v, m, cfg = lower(teachers_all[:k], names, size, classes, 2, {0},
                                          set(range(k)), sequential=sequential, remat=remat,
                                          pieces=pieces)
      t0 = time.perf_counter()
      compiled = fn.lower(state, *fargs, v, np.int32(0), np.int32(1), models=m, cfg=cfg).compile()
      mem = compiled.memory_analysis()
      temp = mem.temp_size_in_bytes
      rows.append({"variant": label, "K": k, "teachers": list(names), "sequential_teachers": sequential,
                   "remat": remat, "efficientnet_pieces": effnet_pieces, "temp_bytes": temp,
                   "argument_bytes": mem.argument_size_in_bytes,
                   "output_bytes": mem.output_size_in_bytes, "compile_s": time.perf_counter() - t0})
      print(f"  {label[:44]:44} K={k} temp {temp / 2**30:7.2f} GiB  args "
            f"{mem.argument_size_in_bytes / 2**30:6.2f} GiB", flush=True)
  for row in rows:
    base = next(r for r in rows if r["K"] == 1 and r["variant"] == row["variant"])
    row["ratio_to_K1"] = row["temp_bytes"] / base["temp_bytes"]
  return rows


def part_flops(args):
  size = args.flops_size
  teachers = build_teachers(("resnet18",), "imagenet", 1.0, size, 1000)
  out = {}
  for label, names, ce, bn in (("shared (one forward)", ("resnet18",), {0}, {0}),
                               ("separate logit + BN forwards", ("resnet18", "resnet18"), {0}, {1}),
                               ("logits only (CE)", ("resnet18",), {0}, set())):
    fn, state, fargs, v, m, cfg = lower(teachers * len(names), names, size, args.flops_batch, 2, ce, bn)
    out[label] = static_cost(state, fargs, v, m, cfg, tuple(range(len(names))))["flops"]
    print(f"  {label:30} {out[label] / 1e9:9.2f} GFLOP per iteration ({args.flops_batch} images)",
          flush=True)
  return out


def part_schedule(args):
  rows = []
  spec = selection.SelectionSpec("resnet18", "resnet18", ("mobilenet_v2", "efficientnet_b0",
                                                          "shufflenet_v2_x0_5", "alexnet"))
  for dataset, classes, per_batch, ipc in (("ImageNet-1K", 1000, 100, 10), ("ImageNet-1K", 1000, 100, 50),
                                           ("CIFAR-10", 10, 10, 10), ("CIFAR-10", 10, 10, 50)):
    units = schedule.make_units(classes, ipc, per_batch,
                                lambda i, c: selection.pre_selection(spec, 0, i, c, "ipc"),
                                lambda i: schedule.iterations_for(i, 4000, 500, 8))
    for devices, per_device in ((1, 1), (8, 1), (8, 4)):
      waves = schedule.plan_waves(units, devices * per_device, rows_per_device=per_device)
      work = schedule.useful_work(waves, devices)
      rows.append({"dataset": dataset, "ipc": ipc, "devices": devices, "units_per_device": per_device,
                   "units": len(units), "waves": len(waves), **work})
      print(f"  {dataset:12} IPC {ipc:3d} {devices} device(s) x {per_device} unit(s): {len(units):5d} "
            f"batches in {len(waves):4d} waves, useful-work fraction {work['useful_fraction']:.3f}, "
            f"device occupancy {work['device_occupancy']:.3f}", flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--parts", default="schedule,flops,throughput,memory")
  parser.add_argument("--width32", type=float, default=0.5, help="teacher width at 32 px")
  parser.add_argument("--iters32", type=int, default=20)
  parser.add_argument("--batch224", type=int, default=4, help="images per batch at 224 px")
  parser.add_argument("--iters224", type=int, default=3)
  parser.add_argument("--gatings", default="", help="teacher gatings to time, e.g. 'static,cond' "
                      "(default: both on CPU, cond elsewhere)")
  parser.add_argument("--mem-variants", default="",
                      help="indices into MEMORY_VARIANTS to compile (default: all)")
  parser.add_argument("--mem-batch", type=int, default=100)
  parser.add_argument("--mem-size", type=int, default=224)
  parser.add_argument("--flops-size", type=int, default=224)
  parser.add_argument("--flops-batch", type=int, default=8)
  parser.add_argument("--out", default="bench_out/recover.json")
  args = parser.parse_args()
  result = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "jax": jax.__version__}
  for part in args.parts.split(","):
    print(f"[{part}]", flush=True)
    result[part] = globals()[f"part_{part}"](args)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  runtime.configure_jax()
  main()
