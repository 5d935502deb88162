"""Baselines on ImageNet-1K with a ResNet-18 student: SRe2L and intra-distillation PRISM.

The parameter is `<baseline>_ipc<N>`, N in {10, 50, 100}:

  sre2l   SRe2L end to end: one ResNet-18 for logits and BN, noise init, lr 0.25, constant T 4000
          (recover method `sre2l`), evaluated with SRe2L's own `sre2l` protocol (ResNet-18 soft
          labels, KL with T 20, cosine, batch 1024, 300 epochs)
  intra   PRISM with teachers re-drawn at every iteration (recover method `prism_intra`: logit
          teacher from ResNet-18 + the pool, bernoulli BN set), `prism` protocol, so it compares
          directly with configs/imagenet_prism.py:ipc<N>_r18

  python -m prism_jax.main --config configs/imagenet_baselines.py:sre2l_ipc10 --workdir workdirs/in1k_sre2l_ipc10

`--config.evaluate.compare_workdirs="('workdirs/in1k_prism_ipc10_r18',)"` on the evaluate stage puts
a PRISM run's sets in the same report.

Prepare data and teachers once as described in configs/imagenet_prism.py; on a Cloud VM run
`launch/gpu_vm.sh run $FLAGS --config configs/imagenet_baselines.py:sre2l_ipc10 --workdir
workdirs/in1k_sre2l_ipc10 --sync-from gs://MY_BUCKET/tfds:tfds --sync-from
gs://MY_BUCKET/teachers/imagenet1k:teachers/imagenet1k`, as in that file.

Expected cost on one H100, in hours (estimate, same method as configs/imagenet_prism.py; batch 1024
student steps assumed at 40 TFLOP/s):

  parameter    recover  relabel + train + evaluate  total   soft labels on disk
  sre2l_ipc10    2.7          0.5                      3.2     6 GB
  sre2l_ipc50   13.5          1.8                     15      31 GB
  sre2l_ipc100  27            3.3                     30      61 GB
  intra_ipc10    2.1          0.9                      3.0     6 GB
  intra_ipc50   10.6          3.7                     14      31 GB
  intra_ipc100  21.2          7.2                     28      61 GB
"""

from __future__ import annotations

from configs import presets

BASELINES = {"sre2l": ("sre2l", "sre2l"), "intra": ("prism_intra", "prism")}  # name: (recover method, protocol)
ARGS = tuple(f"{name}_ipc{ipc}" for name in BASELINES for ipc in presets.IMAGENET_IPCS)


def get_config(arg: str | None = None):
  name, ipc = presets.choose(arg, ARGS, "configs/imagenet_baselines.py").rsplit("_ipc", 1)
  method, protocol = BASELINES[name]
  return presets.imagenet_config(ipc=int(ipc), student="resnet18", method=method, protocol=protocol)
