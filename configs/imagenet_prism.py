"""PRISM on ImageNet-1K (paper Table 1): IPC 10/50/100, ResNet-18/50/101 students, `prism` protocol.

The parameter is `ipc<N>_r<depth>`, N in {10, 50, 100}, depth in {18, 50, 101}:

  python -m prism_jax.main --config configs/imagenet_prism.py:ipc10_r18 --workdir workdirs/in1k_prism_ipc10_r18

The squeeze stage is skipped (teachers are torchvision ImageNet weights): these configs set
`stage='recover+'`, recover and every stage after it (`--config.stage=all` would first train a
ResNet-18 teacher).
Recovery is the official PRISM recipe: ResNet-18 logits, BN priors from ResNet-18 plus bernoulli
extras from {MobileNetV2, EfficientNet-B0, ShuffleNetV2-0.5, AlexNet} drawn once per IPC index,
real-image init, lr 0.05, T = 4000 - 500 (i mod 8). The recovered images do not depend on the
student (the official R50/R101 scripts also use ResNet-18 logits): a ResNet-50/101 run can reuse a
finished ResNet-18 run's set and skip recover, e.g.:

  python -m prism_jax.main --config configs/imagenet_prism.py:ipc10_r50 \
      --workdir workdirs/in1k_prism_ipc10_r50 --config.stage=relabel+ \
      --config.image_sets="('workdirs/in1k_prism_ipc10_r18/recover',)"

Once, before any ImageNet config (imagenet_prism, imagenet_table2, imagenet_baselines, imagenet_rd3):
  * data: `tfds build imagenet2012 --data_dir=tfds --file_format=array_record` with the two archives
    (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar) in tfds/downloads/manual (the configs read
    `data.tfds_data_dir='tfds'`); or an ImageFolder: `--config.data.source=imagefolder
    --config.data.path=/data/imagenet --config.data.test_split=val` (train/ and val/ class folders);
  * teachers: save each torchvision model's IMAGENET1K_V1 state_dict to pth/<arch>.pth, then
      for a in resnet18 mobilenet_v2 efficientnet_b0 shufflenet_v2_x0_5 alexnet; do
        python -m prism_jax.tools.import_torchvision --arch $a --pth pth/$a.pth --out teachers/imagenet1k/$a
      done

On a Cloud GPU VM (one host; see launch/README.md):

  FLAGS="--name prism-in1k --zone us-central1-a --project MY_PROJECT"
  launch/gpu_vm.sh create $FLAGS --machine-type a3-highgpu-1g --boot-disk-size 500GB
  launch/gpu_vm.sh setup $FLAGS
  launch/gpu_vm.sh run $FLAGS --config configs/imagenet_prism.py:ipc10_r18 \
      --workdir workdirs/in1k_prism_ipc10_r18 --sync-from gs://MY_BUCKET/tfds:tfds \
      --sync-from gs://MY_BUCKET/teachers/imagenet1k:teachers/imagenet1k

(`launch/tpu_vm.sh ... --accelerator-type v4-8` takes the same `run` flags.)

Expected cost on one H100, in hours (estimate, not measured: FLOPs of the models x iterations or
image passes, at an assumed effective 60 TFLOP/s for recovery, calibrated on CDA's reported 29 h for
SRe2L IPC 50 on one RTX 4090 (about 21 TFLOP/s) times 3 for an H100, and 20 TFLOP/s for relabel and
student steps at batch 25-50; plus about 0.2 h for 30 passes over the 50,000 validation JPEGs):

  IPC   recover  relabel  train r18 / r50 / r101   total r18 / r50 / r101   soft labels on disk
  10      2.0      0.25     0.7 /  1.3 /  2.3        3.0 /  3.5 /  4.5          6 GB
  50      9.8      1.2      2.5 /  5.4 / 10.1       13.5 / 16.4 / 21           31 GB
  100    19.7      2.4      4.8 / 10.5 / 19.9       27   / 32.6 / 42           61 GB

Reusing the ResNet-18 run's images removes the recover column. `--config.relabel.mode=online`
stores no soft labels (the teachers then run inside every student step instead).
"""

from __future__ import annotations

from configs import presets

ARGS = presets.IPC_STUDENT_ARGS


def get_config(arg: str | None = None):
  ipc, student = presets.parse_ipc_student(presets.choose(arg, ARGS, "configs/imagenet_prism.py"))
  return presets.imagenet_config(ipc=ipc, student=student, method="prism", protocol="prism")
