"""Throughput of every zoo teacher in JAX next to the same torchvision model in PyTorch.

  python benchmarks/teachers.py --out /tmp/teachers.json --batch 32 --repeats 5

For each model and input size (32 px: 'small' stem; larger: 'imagenet' stem; width 1.0) it times, in
eval mode, the forward pass and forward + backward to the input images (what recover needs), and
prints images/s for JAX and PyTorch and their ratio (JAX / PyTorch, > 1 means JAX is faster).
The PyTorch 'small' variants patch torchvision's modules the same way our small stems differ
(stride-1 first conv, no early down-sampling). Runs on whatever device both frameworks see first
(GPU if available). Timing: median over `--repeats` calls after one warm-up (compile) call.
PyTorch gets one thread per usable CPU; on a shared machine, `taskset -c N python ...` pins both
frameworks to the given cores (other load distorts PyTorch's multi-threaded timings much more).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prism_jax import models, runtime  # noqa: E402


def _usable_cpus() -> int:
  """CPUs this process may run on (respects `taskset`, as XLA's thread pool does)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _median_seconds(fn, repeats: int) -> float:
  fn()  # warm-up: compilation / cudnn autotuning
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def jax_throughput(name: str, size: int, batch: int, repeats: int) -> tuple[float, float]:
  stem = "small" if size <= 64 else "imagenet"
  model = models.create_model(name, num_classes=1000, stem=stem, width=1.0)
  images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
  variables = jax.device_put(models.random_variables(model, images.shape))
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  backward = jax.jit(jax.grad(lambda x, v: jnp.sum(model.apply(v, x, train=False))))
  fwd = _median_seconds(lambda: forward(variables, images).block_until_ready(), repeats)
  bwd = _median_seconds(lambda: backward(images, variables).block_until_ready(), repeats)
  return batch / fwd, batch / bwd


def torch_small_stem(model, name: str):
  """Applies our 'small' stem changes to a torchvision model."""
  import torch.nn as tnn

  if name.startswith("resnet"):
    model.conv1 = tnn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = tnn.Identity()
  elif name == "mobilenet_v2":
    model.features[0][0].stride = (1, 1)
    model.features[2].conv[1][0].stride = (1, 1)
  elif name.startswith("shufflenet"):
    model.conv1[0].stride = (1, 1)
    model.maxpool = tnn.Identity()
  elif name == "efficientnet_b0":
    model.features[0][0].stride = (1, 1)
    model.features[2][0].block[1][0].stride = (1, 1)
  elif name == "alexnet":
    model.features[0] = tnn.Conv2d(3, 64, 3, 1, 1)
    model.avgpool = tnn.AdaptiveAvgPool2d((3, 3))
    model.classifier[1] = tnn.Linear(256 * 9, 4096)
  return model


def torch_throughput(name: str, size: int, batch: int, repeats: int) -> tuple[float, float]:
  import torch
  import torchvision

  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = getattr(torchvision.models, name)(weights=None, num_classes=1000)
  if size <= 64:
    model = torch_small_stem(model, name)
  model = model.to(device).eval()
  images = torch.randn(batch, 3, size, size, device=device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def forward():
    with torch.inference_mode():
      model(images)
    sync()

  def backward():
    x = images.clone().requires_grad_(True)
    model(x).sum().backward()
    sync()

  return batch / _median_seconds(forward, repeats), batch / _median_seconds(backward, repeats)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="teachers_benchmark.json")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
  parser.add_argument("--models", nargs="+", default=list(models.available_models()))
  parser.add_argument("--no-torch", action="store_true", help="time JAX only")
  args = parser.parse_args()

  if not args.no_torch:
    import torch
    torch.set_num_threads(_usable_cpus())
  rows = []
  header = f"{'model':20s} {'px':>4s} | {'jax fwd':>9s} {'torch fwd':>9s} {'ratio':>6s} | " \
           f"{'jax f+b':>9s} {'torch f+b':>9s} {'ratio':>6s}   (images/s)"
  print(f"device: {jax.devices()[0].device_kind}; batch {args.batch}; width 1.0", flush=True)
  print(header, flush=True)
  for size in args.sizes:
    for name in args.models:
      jax_fwd, jax_bwd = jax_throughput(name, size, args.batch, args.repeats)
      torch_fwd = torch_bwd = float("nan")
      if not args.no_torch:
        torch_fwd, torch_bwd = torch_throughput(name, size, args.batch, args.repeats)
      row = dict(model=name, size=size, stem="small" if size <= 64 else "imagenet",
                 jax_forward=jax_fwd, torch_forward=torch_fwd, forward_ratio=jax_fwd / torch_fwd,
                 jax_forward_backward=jax_bwd, torch_forward_backward=torch_bwd,
                 forward_backward_ratio=jax_bwd / torch_bwd)
      rows.append(row)
      print(f"{name:20s} {size:4d} | {jax_fwd:9.1f} {torch_fwd:9.1f} {row['forward_ratio']:6.2f} | "
            f"{jax_bwd:9.1f} {torch_bwd:9.1f} {row['forward_backward_ratio']:6.2f}", flush=True)
  meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, batch=args.batch,
              repeats=args.repeats, host=platform.node(), cpus=_usable_cpus())
  with open(args.out, "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  runtime.configure_jax()
  sys.exit(main())
