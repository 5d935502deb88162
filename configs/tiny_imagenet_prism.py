"""PRISM on Tiny-ImageNet end to end: squeeze five small-stem teachers, recover, relabel, train, evaluate.

The parameter is the IPC, `ipc10`, `ipc50` or `ipc100`:

  python -m prism_jax.main --config configs/tiny_imagenet_prism.py:ipc50 --workdir workdirs/tiny_prism_ipc50

Data: an ImageFolder in data/tiny-imagenet-200 with train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (the
official archive keeps train images in train/<wnid>/images/ and the validation images in one folder
listed by val_annotations.txt: move them into one folder per class first). On a Cloud GPU VM (see
launch/README.md):

  FLAGS="--name prism-tiny --zone us-central1-a --project MY_PROJECT"
  launch/gpu_vm.sh create $FLAGS --machine-type a3-highgpu-1g && launch/gpu_vm.sh setup $FLAGS
  launch/gpu_vm.sh run $FLAGS --config configs/tiny_imagenet_prism.py:ipc50 --workdir workdirs/tiny_prism_ipc50 \
      --sync-from gs://MY_BUCKET/data/tiny-imagenet-200:data/tiny-imagenet-200

(`launch/tpu_vm.sh ... --accelerator-type v4-8` takes the same `run` flags.)

Squeeze: the five PRISM teachers (small stem) with the Tiny-ImageNet recipe SRe2L/CDA use (the
torchvision reference script: SGD 0.2, momentum 0.9, wd 1e-4, batch 256, 50 epochs with 5 warm-up
epochs, RandomResizedCrop + flip; ResNet-18 reaches about 59.6%). Recover: PRISM selection, real-image
init, lr 0.05, r_bn 0.01, T = 4000 - 500 (i mod 8), RandomResizedCrop 0.08-1 + flip + roll of 0-8 px
(nine shifts, as SRe2L's Tiny recovery rolls by -4..4; 4 px at 32 px scaled to 64 px),
two recovery batches of 100 classes per IPC index. Relabel + train: the `prism` protocol with a
small-stem ResNet-18.

Expected cost on one H100, in hours (estimate: model FLOPs at 64 px, four times those at 32 px, x
iterations or image passes, at the throughputs assumed in configs/imagenet_prism.py): squeeze 2-3 h
(about 0.6 h for the ResNet-18); recover 0.5 / 2.5 / 4.9 h and relabel + train + evaluate 0.2 / 0.9 /
1.7 h at IPC 10 / 50 / 100.
"""

from __future__ import annotations

from configs import common, presets

ARGS = ("ipc10", "ipc50", "ipc100")


def get_config(arg: str | None = None):
  ipc = int(presets.choose(arg, ARGS, "configs/tiny_imagenet_prism.py")[len("ipc"):])
  config = presets.small_prism_config(ipc)
  config.data = common.data_config(source="imagefolder", name="tiny_imagenet", path="data/tiny-imagenet-200")
  config.data.image_size = 64  # native size (name selects the Tiny-ImageNet mean/std)
  config.data.test_split = "val"  # the labelled validation images (test/ has no labels)
  sq = config.squeeze
  sq.learning_rate = 0.2
  sq.weight_decay = 1e-4
  sq.batch_size = 256
  sq.epochs = 50.0             # SRe2L recovers from the 50-epoch teacher (fewer epochs recover better)
  sq.warmup_epochs = 5.0
  sq.augment = "rrc_flip"      # RandomResizedCrop + flip, the torchvision reference script
  rc = config.recover
  rc.jitter = 8                # roll 0-8 px at 64 px
  return config
