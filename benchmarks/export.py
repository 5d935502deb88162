"""Export benchmark: writing a recovered set (PNGs, images.npz, manifest) with 1..N writer threads.

  python benchmarks/export.py --num 2000 --size 224 --workers 1,4 --out bench_out/export.json
  python benchmarks/export.py --dir gs://BUCKET/scratch --workers 1,32      # a bucket (needs credentials)

Calls the recover stage's exporter (prism_jax/recover/export.py) on random images, which PNG
cannot compress (the worst case; recovered images compress a little), once per writer count, each
into a fresh directory under --dir (default: a local temporary directory). Reports images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num", type=int, default=2000, help="images to write")
  parser.add_argument("--size", type=int, default=224, help="image side in pixels")
  parser.add_argument("--classes", type=int, default=100)
  parser.add_argument("--workers", default="1,4", help="comma-separated writer-thread counts")
  parser.add_argument("--dir", default="", help="where to write (local or gs://); default: a temporary directory")
  parser.add_argument("--out", default="bench_out/export.json")
  args = parser.parse_args()

  import numpy as np
  from prism_jax.io import artifacts, fs
  from prism_jax.recover import export

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.num, args.size, args.size, 3), dtype=np.uint8)
  labels = np.arange(args.num) % args.classes
  ipc = np.arange(args.num) // args.classes
  names = [f"class{i}" for i in range(args.classes)]
  manifest = [{"class": int(c), "ipc_index": int(i)} for c, i in zip(labels, ipc)]
  base = args.dir or tempfile.mkdtemp(prefix="prism_bench_export_")
  rows = []
  for workers in (int(w) for w in args.workers.split(",")):
    out_dir = os.path.join(base, f"workers{workers}_{int(time.time())}")
    export.LOCAL_WRITERS = export.REMOTE_WRITERS = workers
    start = time.perf_counter()
    export.write_outputs(out_dir, images, labels, ipc, names, manifest)
    seconds = time.perf_counter() - start
    assert fs.exists(os.path.join(out_dir, "images.npz"))
    rows.append({"workers": workers, "seconds": seconds, "images_per_sec": args.num / seconds})
    print(f"{workers:>3} writer(s): {args.num} images of {args.size}px in {seconds:6.2f} s = "
          f"{args.num / seconds:7.1f} img/s", flush=True)
  result = {"num": args.num, "size": args.size, "dir": "remote" if fs.is_remote(base) else "local",
            "cpu_count": os.cpu_count(), "rows": rows}
  artifacts.write_json(args.out, result)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
