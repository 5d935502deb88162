"""Every config section with its defaults: the schema of `config` (pure data).

This module and `schema/presets.py` import nothing but ml_collections, so config files
(configs/*.py) and tools read settings without importing JAX or any runtime module. Experiment files
start from `base_config()` and override only what differs. Durations are in epochs; the stages
convert them to steps at run time from the data size. Nothing here reads the device count.
"""

from __future__ import annotations

import ml_collections

STAGES = ("squeeze", "diffusion", "distill", "relabel", "train", "evaluate", "all")
PRECISION_STAGES = ("squeeze", "recover", "relabel", "train")


def data_defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.source = "digits"          # digits | arrays | imagefolder | tfds
  c.name = "digits"            # TFDS name for source=tfds, else a display name; selects 'auto' stats
  c.path = ""                  # directory for arrays (train.npz/test.npz) and imagefolder sources
  c.tfds_data_dir = ""         # '' = TFDS default data_dir
  c.image_size = 0             # 0 = native size; else resized (+ centre-cropped) to S x S, see module doc
  c.train_split = "train"      # split name (TFDS split, or imagefolder sub-directory)
  c.test_split = "test"        # imagenet2012 uses 'validation'
  c.max_per_class = 0          # 0 = all; N keeps the first N train images of each class (tiny runs)
  c.normalization = "auto"     # auto | dataset | custom | a stats.PRESETS name
  c.mean = ()                  # RGB mean in [0, 1] units, only with normalization='custom'
  c.std = ()                   # RGB std, only with normalization='custom'
  return c


def precision_config() -> ml_collections.ConfigDict:
  """`config.precision`: one policy per stage, 'auto' everywhere (see the module docstring)."""
  c = ml_collections.ConfigDict()
  for stage in PRECISION_STAGES:
    s = ml_collections.ConfigDict()
    s.param_dtype = "float32"      # parameters, BN statistics, optimizer state
    s.compute_dtype = "auto"       # auto | float32 | bfloat16
    s.matmul_precision = "auto"    # auto | default | high | highest
    c[stage] = s
  return c


def data_config(source: str = "digits", name: str = "digits", path: str = "") -> ml_collections.ConfigDict:
  """`config.data`; fields are documented in prism_jax/data/sources.py (default_data_config)."""
  c = data_defaults()
  c.source = source            # digits | arrays | imagefolder | tfds
  c.name = name                # dataset name (TFDS name for source=tfds); selects normalization
  c.path = path                # directory for arrays (train.npz/test.npz) or imagefolder sources
  return c


def squeeze_config() -> ml_collections.ConfigDict:
  """Teacher training. Defaults: the CIFAR recipe of the references (SGD 0.1, wd 5e-4, bs 128)."""
  c = ml_collections.ConfigDict()
  c.teachers = ("resnet18",)   # zoo names; each is trained with the recipe below
  c.max_per_class = 0          # 0 = the data as configured; N = train on the first N images of each class
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
  # 'static': the host drives iterations, one program per teacher used (XLA:CPU runs nested
  # convolutions ~3.5x slower); 'auto': static on CPU, cond elsewhere.
  c.teacher_gating = 'auto'
  c.remat = True               # keep only block outputs for backward (memory); False: faster, more memory
  # Per-teacher pieces of a recovery batch, e.g. 'efficientnet_b0=2': exact whole-batch gradient
  # with that teacher's activations split (memory) for one extra forward pass. '' = no split.
  c.teacher_pieces = ''
  c.export_jpeg = False        # also write JPEG-75 files (what the official pipeline saves)
  return c


def relabel_config() -> ml_collections.ConfigDict:
  """Soft labels (SPEC 5). Defaults: the `prism` protocol (see set_protocol)."""
  c = ml_collections.ConfigDict()
  c.mode = "stored"            # stored: per-epoch shards on disk; online: teachers run in the student step
  c.teachers = ("resnet18", "mobilenet_v2", "alexnet", "shufflenet_v2_x0_5")
  c.aggregation = "norm_rescaled_mean"  # norm_rescaled_mean (official PRISM) | mean | single
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
  # The weights the stage keeps: 'ema' (DiT's choice), 'raw' (the optimizer's), or 'auto': the EMA unless
  # its final held-out loss is above the raw weights' (a short run, whose EMA still holds much of the
  # random initialization). Not part of the training recipe: changing it re-saves, it does not retrain.
  c.weights = "auto"
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
  # DD-Ranking's label-robust metrics (IOR, HLR, LRS; metrics/ranking.py):
  c.random_sets = ("random_real",)  # the random-real sets (one per seed) IOR is measured against
  c.hard_label_workdir = ""    # a work directory that trained the same sets under the hard_label protocol (HLR)
  c.full_data_top1 = -1.0      # top-1 (%) of a student trained on the whole training set with hard labels; -1 = unknown
  c.lrs_weight = 0.5           # w of LRS = f(w IOR - (1 - w) HLR)
  return c


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "all"              # squeeze | diffusion | distill (alias recover) | relabel | train | evaluate | all
  c.seed = 0
  c.teachers_dir = ""          # teachers are squeezed into and read from here; '' = <workdir>/teachers
  c.data = data_config()
  c.mesh = ml_collections.ConfigDict()
  c.mesh.num_devices = -1      # -1: every device of every process
  c.squeeze = squeeze_config()
  c.diffusion = diffusion_config()
  c.recover = recover_config()
  # The distilled sets of this run, made by the distill stage (except directories) and each relabeled,
  # trained on and evaluated: 'recover' (the method config.recover describes), 'random_real', a name
  # in config.methods, or a directory holding another run's images.npz.
  c.image_sets = ("recover",)
  c.methods = ml_collections.ConfigDict()  # named method instances: see add_method
  c.method_modules = ()        # extra modules imported before the run; each registers its methods
  c.relabel = relabel_config()
  c.train = train_config()
  c.evaluate = evaluate_config()
  c.progress_interval_s = 10.0  # seconds between terminal progress lines
  # Per-stage parameter/compute dtype and matmul precision; 'auto' = float32 on CPU, bfloat16 compute
  # for squeeze/relabel/train and full-precision float32 recover on GPU/TPU (prism_jax/train/precision.py).
  c.precision = precision_config()
  return c


def add_method(config: ml_collections.ConfigDict, name: str, method: str, **settings) -> ml_collections.ConfigDict:
  """Adds the distilled set `name`, made by the registered method `method`, to `config.image_sets`.

  `settings` are the fields of the method's settings that differ from the shared ones: for the
  recover methods (prism, sre2l, prism_intra, the Table 2 rows) the shared settings are
  `config.recover` with the method's preset applied (schema/presets.py), and `settings` overrides
  fields of it; for random_real, `ipc` and `seed` (default: recover.ipc and the run's seed). On the
  command line: `--config.methods.<name>.settings.<field>=...` for a field set here, or
  `--config.recover.<field>=...` for every recover method at once.
  """
  instance = ml_collections.ConfigDict()
  instance.method = method
  instance.settings = ml_collections.ConfigDict(settings)
  config.methods[name] = instance
  if name not in config.image_sets:
    config.image_sets = tuple(config.image_sets) + (name,)
  return config
