"""Shared presets. Experiment files start from `base_config()` and override only what differs.

Durations are in epochs; the stages convert them to steps at run time from the data size.
Nothing here reads the device count: per-device quantities are derived at run time.
"""

from __future__ import annotations

import ml_collections

from prism_jax.data import sources
from prism_jax.train import precision, protocols

STAGES = ("squeeze", "diffusion", "recover", "relabel", "train", "evaluate", "all")


def data_config(source: str = "digits", name: str = "digits", path: str = "") -> ml_collections.ConfigDict:
  """`config.data`; fields are documented in prism_jax/data/sources.py (default_data_config)."""
  c = sources.default_data_config()
  c.source = source            # digits | arrays | imagefolder | tfds
  c.name = name                # dataset name (TFDS name for source=tfds); selects normalization
  c.path = path                # directory for arrays (train.npz/test.npz) or imagefolder sources
  return c


def squeeze_config() -> ml_collections.ConfigDict:
  """Teacher training. Defaults: the CIFAR recipe of the references (SGD 0.1, wd 5e-4, bs 128)."""
  c = ml_collections.ConfigDict()
  c.teachers = ("resnet18",)   # zoo names; each is trained with the recipe below
  c.stem = "small"             # small: 32-64 px inputs; imagenet: torchvision architecture
  c.width = 1.0                # channel multiplier (CPU presets use narrow teachers)
  c.epochs = 200.0            # may be fractional
  c.batch_size = 128           # global batch, split over all devices
  c.optimizer = "sgd"          # sgd | adamw
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 5e-4        # not applied to BatchNorm parameters and biases
  c.warmup_epochs = 1.0
  c.label_smoothing = 0.0
  c.augment = "crop_flip"      # crop_flip: pad-4 random crop + flip; rrc_flip: RandomResizedCrop + flip; none
  c.eval_every_epochs = 10.0   # 0: only at the end
  c.eval_batch_size = 256
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  return c


def recover_config() -> ml_collections.ConfigDict:
  """Image synthesis. Defaults reproduce the official PRISM code (ImageNet-1K, ResNet-18 presets)."""
  c = ml_collections.ConfigDict()
  c.ipc = 10                   # images per class: IPC indices [ipc_start, ipc)
  c.ipc_start = 0
  c.classes_per_batch = 100    # classes in one recovery batch (one image each, same IPC index)
  c.teachers_dir = ""          # '' = <workdir>/teachers; one sub-directory per model name
  # Teacher selection (SPEC 4.2).
  c.logit_teacher = "resnet18"  # supplies the CE logits (the official code always uses resnet18)
  c.bn_primary = ""            # first BN teacher; '' = the logit teacher
  c.bn_pool = ("mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5", "alexnet")
  c.distribution = "bernoulli"  # bernoulli | uniform_subsets | fixed | single
  c.k_max = 4                  # at most this many BN teachers (primary included)
  c.p = 0.5                    # bernoulli: probability of filling each extra slot
  c.include_primary = True     # uniform_subsets: always include the primary
  c.fixed_teachers = ()        # fixed: the BN teachers, in order
  c.logit_pool = ()            # intra: logit teacher re-drawn from (logit_teacher,) + logit_pool
  c.strategy = "pre"           # pre: drawn once per unit; intra: re-drawn every iteration
  c.granularity = "ipc"        # ipc: one draw per IPC index (official); batch: per recovery batch
  c.count_bn_only = False      # False: a BN-less teacher (alexnet) counts in K (official)
  # Objective and optimization (SPEC 4.1, 4.3).
  c.r_bn = 0.01
  c.first_bn_multiplier = 10.0
  c.tv_weight = 0.0            # TV prior (off, as in the official scripts)
  c.l2_weight = 0.0
  c.init = "real"              # real: the i-th training image of each class; noise: N(0, 1)
  c.learning_rate = 0.05       # Adam(0.5, 0.9) on pixels, cosine per unit without warm-up
  c.iterations = 4000          # T(i) = iterations - iteration_step * (i mod iteration_period)
  c.iteration_step = 500
  c.iteration_period = 8
  c.jitter = -1                # roll jitter in px; -1 = 32 * image_size / 224 (4 at 32 px)
  c.rrc_scale = (0.08, 1.0)
  c.flip = True
  # Execution (SPEC 4.5).
  c.units_per_device = 1       # recovery batches per device in one wave (vmapped together)
  c.iterations_per_call = 50   # iterations per compiled call (progress/NaN check granularity)
  c.checkpoint_every_iterations = 500  # mid-wave checkpoints (0: only finished waves are kept)
  c.sequential_teachers = True  # one teacher's activations live at a time; unused teachers skipped
  # 'cond': iterations loop on the device, each teacher behind a conditional (accelerators);
  # 'static': the host drives iterations, one program per teacher set (XLA:CPU runs nested
  # convolutions ~3.5x slower); 'auto': static on CPU, cond elsewhere.
  c.teacher_gating = 'auto'
  c.remat = True               # keep only block outputs for backward (memory); False: faster, more memory
  # Per-teacher pieces of a recovery batch, e.g. 'efficientnet_b0=2': exact whole-batch gradient
  # with that teacher's activations split (memory) for one extra forward pass. '' = no split.
  c.teacher_pieces = ''
  c.export_jpeg = False        # also write JPEG-75 files (what the official pipeline saves)
  return c


PRISM_POOL = ("mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5", "alexnet")
RECOVER_METHODS = ("prism", "prism_uniform", "prism_intra", "sre2l", "single_pre", "decoupled_pre",
                   "decoupled_intra", "multi_k2", "multi_k3", "multi_k4")


def set_recover_method(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
  """Sets config.recover for a named method (paper Table 2 rows and the baselines).

  prism            official PRISM: bernoulli extras (p 0.5, k_max 4), drawn once per IPC index
  prism_uniform    paper eq. 5: uniform over subsets with the primary and up to 3 extras
  prism_intra      logit teacher and BN set re-drawn every iteration (G-VBSM-like ablation)
  sre2l            one teacher for logits and BN, noise init, lr 0.25, constant T
  single_pre       PRISM's recipe (real init, lr 0.05, varying T) with resnet18 alone for logits and BN
  decoupled_pre/intra  logit teacher resnet18 and one *other* BN teacher (mobilenet_v2,
                   efficientnet_b0 or shufflenet_v2_x0_5), drawn per IPC index / per iteration
  multi_kK         logit resnet18 + fixed BN set resnet18 + the first K-1 pool members
  """
  rc = config.recover
  rc.logit_teacher, rc.bn_primary, rc.bn_pool = "resnet18", "", PRISM_POOL
  rc.distribution, rc.strategy, rc.k_max, rc.p = "bernoulli", "pre", 4, 0.5
  rc.init, rc.learning_rate, rc.iteration_step = "real", 0.05, 500
  rc.logit_pool, rc.fixed_teachers = (), ()
  if method == "prism":
    pass
  elif method == "prism_uniform":
    rc.distribution, rc.include_primary = "uniform_subsets", True
  elif method == "prism_intra":
    rc.strategy, rc.logit_pool = "intra", PRISM_POOL
  elif method == "sre2l":
    rc.distribution, rc.init, rc.learning_rate, rc.iteration_step = "single", "noise", 0.25, 0
  elif method == "single_pre":
    rc.distribution = "single"
  elif method in ("decoupled_pre", "decoupled_intra"):
    rc.distribution, rc.k_max, rc.include_primary = "uniform_subsets", 1, False
    rc.bn_primary, rc.bn_pool = PRISM_POOL[0], PRISM_POOL[1:3]
    rc.strategy = "pre" if method == "decoupled_pre" else "intra"
  elif method.startswith("multi_k") and method in RECOVER_METHODS:
    k = int(method[len("multi_k"):])
    rc.distribution, rc.fixed_teachers, rc.k_max = "fixed", ("resnet18",) + PRISM_POOL[:k - 1], k
  else:
    raise ValueError(f"recover method {method!r}: expected one of {RECOVER_METHODS}")
  return config


def relabel_config() -> ml_collections.ConfigDict:
  """Soft labels (SPEC 5). Defaults: the `prism` protocol (see set_protocol)."""
  c = ml_collections.ConfigDict()
  c.mode = "stored"            # stored: per-epoch shards on disk; online: teachers run in the student step
  c.teachers = ("resnet18", "mobilenet_v2", "alexnet", "shufflenet_v2_x0_5")
  c.aggregation = "norm_rescaled_mean"  # norm_rescaled_mean (official PRISM) | mean | single
  c.teachers_dir = ""          # '' = <workdir>/teachers
  c.rrc_scale = (0.25, 1.0)    # RandomResizedCrop area range of the student views
  c.flip = True
  c.cutmix = True              # one CutMix box per batch, lambda ~ Beta(1, 1)
  c.patch_shuffle_grid = 0     # 0: off; g: RDED PatchShuffle on a g x g grid before the crop
  return c


def train_config() -> ml_collections.ConfigDict:
  """Student training (SPEC 6). Defaults: the `prism` protocol (see set_protocol)."""
  c = ml_collections.ConfigDict()
  c.protocol = "prism"         # recorded with every result; set by set_protocol
  c.student = "resnet18"
  c.stem = "small"
  c.width = 1.0
  c.epochs = 300               # also the number of relabel epochs
  c.batch_size = 50            # also the relabel batch size
  c.accumulation = 2           # micro-batches per update (official PRISM: 2 x 25)
  c.loss = "mse_gt"            # mse_gt: MSE(logits) + gamma * CE(hard); kl: KL(T) without T^2
  c.gamma = 0.1
  c.temperature = 20.0
  c.optimizer = "adamw"        # adamw | sgd; no decay on BatchNorm parameters and biases
  c.learning_rate = 1e-3
  c.weight_decay = 0.01
  c.momentum = 0.9             # sgd only
  c.schedule = "prism_cos2"    # cosine | smoothed_cosine | prism_cos2 | constant (stepped per epoch)
  c.zeta = 2.5                 # smoothed_cosine / prism_cos2 stretch; 0 = the schedule's default
  c.warmup_epochs = 0.0
  c.ema_decay = 0.0            # 0: off; e.g. 0.99 (EDC) evaluates an EMA of the weights
  c.seeds = (0,)               # one student per seed; results report mean +- std
  c.eval_every_epochs = 10.0   # on the real test split; best and last top-1 are reported
  c.eval_batch_size = 256
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  return c


def diffusion_config() -> ml_collections.ConfigDict:
  """Class-conditional DiT training on the real training split (stage `diffusion`, SPEC 11), or the
  class check of an imported DiT. Defaults: DiT's recipe (AdamW 1e-4, no decay, EMA 0.9999, label
  dropout 0.1); model '' and import_dir '' skip the stage. space='latent' trains on (or checks an
  imported DiT against) the latents of the VAE in vae_dir."""
  c = ml_collections.ConfigDict()
  c.model = ""                 # '' = nothing to train; else a DiT size name: 'T/2' (tiny), 'S/2', 'B/2', ...
  c.import_dir = ""            # '' or a diffusion_store directory with an imported DiT (then nothing is trained)
  c.class_map = ()             # import_dir only: per data class, its index into the model's classes
  c.space = "pixel"            # pixel: images in [-1, 1] (<= 64 px); latent: latents of the VAE in vae_dir
  c.vae_dir = ""               # space='latent': a diffusion_store 'vae' directory (tools/import_vae)
  c.steps = 400_000            # total training steps
  c.batch_size = 256           # global batch, split over all devices
  c.learning_rate = 1e-4
  c.weight_decay = 0.0
  c.ema_decay = 0.9999
  c.label_dropout = 0.1        # probability of the null class (classifier-free guidance)
  c.learn_sigma_loss = False   # True: also the learned-variance VLB term (DiT's full loss)
  c.log_every_steps = 100      # also the interval of the fixed-batch evaluation loss
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2
  c.sample_steps = 50          # DDIM steps of the final sample grid
  c.cfg_scale = 4.0            # classifier-free guidance scale of the grid
  c.samples_per_class = 4      # rows of diffusion/samples.png (one column per class)
  c.sample_every_steps = 0     # > 0: also a sample grid in TensorBoard every so many steps (a multiple of log_every_steps)
  return c


def evaluate_config() -> ml_collections.ConfigDict:
  """Metrics and pictures (SPEC 8)."""
  c = ml_collections.ConfigDict()
  c.reference_model = "resnet18"  # teacher whose penultimate features measure diversity
  c.grid_per_class = 4         # images per class and method in grid.png
  c.grid_max_classes = 10
  c.umap = True                # UMAP plot per image set (umap-learn)
  c.compare_workdirs = ()      # other work directories whose image sets join the report
  return c


PROTOCOLS = protocols.PROTOCOLS


def set_protocol(config: ml_collections.ConfigDict, protocol: str) -> ml_collections.ConfigDict:
  """Sets relabel + student training to a named evaluation protocol (see prism_jax/train/protocols.py)."""
  return protocols.apply(config, protocol)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "all"              # squeeze | diffusion | recover | relabel | train | evaluate | all
  c.seed = 0
  c.data = data_config()
  c.mesh = ml_collections.ConfigDict()
  c.mesh.num_devices = -1      # -1: every device of every process
  c.squeeze = squeeze_config()
  c.diffusion = diffusion_config()
  c.recover = recover_config()
  c.image_sets = ("recover",)  # sets to relabel/train/evaluate: recover | random_real | <dir with images.npz>
  c.relabel = relabel_config()
  c.train = train_config()
  c.evaluate = evaluate_config()
  c.progress_interval_s = 10.0  # seconds between terminal progress lines
  # Per-stage parameter/compute dtype and matmul precision; 'auto' = float32 on CPU, bfloat16 compute
  # for squeeze/relabel/train and full-precision float32 recover on GPU/TPU (prism_jax/train/precision.py).
  c.precision = precision.precision_config()
  return c
