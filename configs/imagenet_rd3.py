"""PRISM images and random real images on ImageNet-1K under the RD3 evaluation protocol (`rd3`).

RD3 (papers/rd3-paper.txt) re-evaluates decoupled distillation under one protocol and finds that
random real images with the same soft labels are a strong baseline. This experiment recovers the
PRISM set and evaluates it next to `recover.ipc` random real training images per class, both with
ResNet-18 soft labels, PatchShuffle (2x2) + RandomResizedCrop 0.5-1 + flip + CutMix, KL (T 20),
400 epochs, batch 50 and smoothed cosine zeta 1 for a ResNet-18 student, batch 100 and zeta 2
otherwise. The parameter is `ipc<N>_r<depth>` as in configs/imagenet_prism.py:

  python -m prism_jax.main --config configs/imagenet_rd3.py:ipc10_r18 --workdir workdirs/in1k_rd3_ipc10_r18

evaluate/report.md then holds one row per set (recover, random_real). Prepare data and teachers
once as described in configs/imagenet_prism.py; on a Cloud VM run
`launch/gpu_vm.sh run $FLAGS --config configs/imagenet_rd3.py:ipc10_r18 --workdir
workdirs/in1k_rd3_ipc10_r18 --sync-from gs://MY_BUCKET/tfds:tfds --sync-from
gs://MY_BUCKET/teachers/imagenet1k:teachers/imagenet1k`, as in that file.

Expected cost on one H100, in hours (estimate, same method as configs/imagenet_prism.py; two image
sets, each relabeled and trained for 400 epochs; about 0.3 h of evaluation passes per student):

  IPC   recover  relabel (2 sets)  train (2 sets) r18 / r50 / r101   total r18 / r50 / r101   soft labels
  10      2.0         0.4              1.8 /  3.4 /  6.0                4.2 /  5.8 /  8.4        16 GB
  50      9.8         2.0              6.6 / 14.4 / 27                 18   / 26   / 39          82 GB
  100    19.7         4.0             12.8 / 28   / 53                 37   / 52   / 77         164 GB

At IPC 50/100, `--config.relabel.mode=online` avoids storing the soft labels (one ResNet-18 forward
per student step instead).
"""

from __future__ import annotations

from configs import presets

ARGS = presets.IPC_STUDENT_ARGS


def get_config(arg: str | None = None):
  ipc, student = presets.parse_ipc_student(presets.choose(arg, ARGS, "configs/imagenet_rd3.py"))
  config = presets.imagenet_config(ipc=ipc, student=student, method="prism", protocol="rd3")
  config.image_sets = ("recover", "random_real")  # RD3's strong baseline, same labels and training
  return config
