"""Selection and generation methods on ImageNet-1K, Imagenette and Imagewoof with the public DiT-XL/2
(256 px) and Stable Diffusion VAE, next to PRISM, SRe2L and random real images, one protocol.

The parameter is `<data>_ipc<N>`, data in {imagenet1k, imagenette, imagewoof}, N in {10, 50}:

  python -m prism_jax.main --config configs/imagenet_diffusion.py:imagenette_ipc10 \
      --workdir workdirs/imagenette_diffusion_ipc10

Once, before these configs (nothing downloads at run time):
  * the DiT and the VAE (files you fetch yourself):
      python -m prism_jax.tools.import_dit --pth pth/DiT-XL-2-256x256.pt --out models/dit_xl2_256
      python -m prism_jax.tools.import_vae --weights pth/sd-vae-ft-ema/diffusion_pytorch_model.safetensors \
          --out models/sd_vae_ft_ema
  * ImageNet-1K teachers: torchvision ImageNet weights imported into teachers/imagenet1k
    (configs/imagenet_prism.py); ResNet-18 is the RDED observer and a relabel teacher. Imagenette and
    Imagewoof have 10 classes, so their teachers are squeezed on the subset first (stage 'all':
    the five PRISM teachers, torchvision architectures, SUBSET_TEACHER_EPOCHS epochs each);
  * data: ImageNet-1K as for configs/imagenet_prism.py; Imagenette / Imagewoof (fast.ai's full-size
    releases) as ImageFolders: `--config.data.path=/data/imagenette2` with train/ and val/ folders
    named by WordNet id. Their classes map onto ImageNet-1K's by the CLASS_MAPS below (sorted
    WordNet ids -> ImageNet class index), so the ImageNet DiT and teachers serve them.

All sets are 256 px (the DiT-XL/2 resolution; 32x32x4 latents), and relabel and students work at
256 px too (a deviation from the 224 px PRISM protocol, in the README). ImageNet-1K runs from the
'diffusion' stage on ('diffusion+'): the diffusion stage only checks the imported DiT's classes and
shapes (nothing is trained), then distill makes every set, and relabel, train and evaluate follow.

On a Cloud GPU VM (launch/README.md), as for PRISM:

  launch/gpu_vm.sh run $FLAGS --config configs/imagenet_diffusion.py:imagenette_ipc10 \
      --workdir workdirs/imagenette_diffusion_ipc10 --sync-from gs://MY_BUCKET/models:models \
      --sync-from gs://MY_BUCKET/teachers/imagenet1k:teachers/imagenet1k \
      --sync-from gs://MY_BUCKET/data/imagenette2:data/imagenette2

Expected cost on one H100 (estimate from DiT-XL/2's 119 GFLOPs per forward at 256 px, at an
assumed 200 TFLOP/s in bfloat16-free float32 with TF32 matmuls ~ 1.7 ms per image-step):
  dit      50 steps x 2 (CFG) per image: Imagenette IPC 10 (100 images) ~20 s; ImageNet IPC 10 ~1 h
  dap      + one partial forward-backward (8 of 28 blocks) on the guided half of the steps and
           the references' features (50 per class): about 1.5x dit
  dps      300 images x 5 crops x 8 draws x 2 per class: ~6 min per class (Imagenette ~1 h;
           ImageNet-1K ~4 days: lower mipc / n_draws there)
  rded     300 x 5 ResNet-18 forwards per class: minutes for Imagenette, ~1 h for ImageNet-1K
"""

from __future__ import annotations

from configs import common, presets

DATA = ("imagenet1k", "imagenette", "imagewoof")
ARGS = tuple(f"{d}_ipc{n}" for d in DATA for n in (10, 50))
# Sorted WordNet ids of each subset -> ImageNet-1K class index (the DiT's and the teachers' classes).
CLASS_MAPS = {
    "imagenette": (0, 217, 482, 491, 497, 566, 569, 571, 574, 701),
    "imagewoof": (155, 159, 162, 167, 182, 193, 207, 229, 258, 273),
}
DIT_DIR, VAE_DIR = "models/dit_xl2_256", "models/sd_vae_ft_ema"
METHODS = ("random_real", "sre2l", "prism", "rded", "dps", "dit", "dap")
SUBSET_TEACHERS = ("resnet18", "mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5", "alexnet")
SUBSET_TEACHER_EPOCHS = 50


def make_config(data: str, ipc: int, methods=METHODS, protocol: str = "prism"):
  config = presets.imagenet_config(ipc=ipc, method="prism", protocol=protocol)
  config.stage = "diffusion+"
  if data != "imagenet1k":
    config.data = common.data_config(source="imagefolder", name=data, path=f"data/{data}2")
    config.data.test_split = "val"
    config.stage, config.teachers_dir = "all", ""   # squeeze the subset's own teachers first
    sq = config.squeeze
    sq.teachers, sq.stem, sq.epochs = SUBSET_TEACHERS, "imagenet", float(SUBSET_TEACHER_EPOCHS)
  config.data.image_size = 256
  dc = config.diffusion
  dc.import_dir, dc.vae_dir, dc.space = DIT_DIR, VAE_DIR, "latent"
  dc.class_map = CLASS_MAPS.get(data, ())
  config.image_sets = ()
  for method in methods:
    if method == "random_real":
      common.add_method(config, method, method)
    elif method == "rded":
      common.add_method(config, method, method, observer="resnet18", factor=2)
    elif method == "sre2l":  # one teacher: none of the PRISM set's EfficientNet-B0 pieces
      common.add_method(config, method, method, teacher_pieces="")
    elif method in ("dit", "dap"):
      common.add_method(config, method, method, num_steps=50, cfg_scale=4.0, per_device_batch=25)
    else:
      common.add_method(config, method, method)
  return config


def get_config(arg: str | None = None):
  arg = presets.choose(arg, ARGS, "configs/imagenet_diffusion.py")
  data, ipc = arg.split("_ipc")
  return make_config(data, int(ipc))
