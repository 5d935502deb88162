"""Methods side by side on real CIFAR-10 under one protocol, in one run and one work directory:
random real images, SRe2L, PRISM (pre-selection, bernoulli), PRISM intra (optimization), RDED and
DPS (selection), plain DiT samples and DAP (generation). DPS, dit and DAP use a pixel-space DiT that
the diffusion stage trains on the training split first (its time is in the report).

The parameter is the budget, optionally with the IPC and the protocol: `small` (IPC 10, `prism`
protocol), `small_hard` (hard-label protocol), `small_ipc50`, `large` (BUDGETS also holds `smoke`, a
seconds-scale wiring check used by benchmarks/quality_cifar10.py --budget smoke).

  python -m prism_jax.main --config configs/cifar10_compare.py:small --workdir workdirs/c10_compare \
      --config.data.path=/path/to/cifar10

On a Cloud GPU VM (see launch/README.md), the paper-scale budget:

  launch/gpu_vm.sh run $FLAGS --config configs/cifar10_compare.py:large --workdir workdirs/c10_compare \
      --sync-from gs://MY_BUCKET/data/cifar10:data/cifar10

Every method's set is made by the distill stage into the same work directory (sets/<method>/distill),
then relabeled, trained on (one student per seed) and evaluated by the same stages with the same
settings: the sets differ, nothing else. `evaluate/report.md` holds the table (student top-1 mean ±
std over seeds, intra-/inter-class cosine under the resnet18 teacher, seconds per stage), the image
grid and a UMAP plot per set. A `_hard` suffix (e.g. `small_hard`) selects the hard-label protocol
instead of `prism`; `small_hard@<workdir>` trains the sets another run made (`<workdir>`, e.g. the
`small` run) under hard labels without making them again:

  python -m prism_jax.main --config configs/cifar10_compare.py:small_hard@workdirs/c10_compare \
      --workdir workdirs/c10_compare_hard --config.data.path=/path/to/cifar10

`small_full` trains the full-data reference of DD-Ranking's hard-label recovery (a student on all
50,000 training images with hard labels, the budget's student width, for 2 epochs and one seed:
the student's 100 epochs on 50,000 images would take about 9 hours here); pass its top-1 and the
hard-label run to the comparison's evaluate stage for HLR and LRS:

  python -m prism_jax.main --config configs/cifar10_compare.py:small_full --workdir workdirs/c10_full
  python -m prism_jax.main --config configs/cifar10_compare.py:small --workdir workdirs/c10_compare \
      --config.stage=evaluate --config.evaluate.hard_label_workdir=workdirs/c10_compare_hard \
      --config.evaluate.full_data_top1=<top-1 % of c10_full>

`benchmarks/quality_cifar10.py` is a thin wrapper that runs this config and
writes a JSON summary. Recovery uses the recover defaults (RandomResizedCrop 0.08-1 + flip + a 4 px
roll at 32 px), as the benchmark always has; configs/cifar10_prism.py uses SRe2L's CIFAR recovery
augmentation instead.

Budgets (what is shrunk is shrunk for every method alike):
  The hard-label protocol's batch (128) is larger than IPC 10's 100 images: those runs use the
  soft protocol's batch, 50.

  small   teachers width 0.25 trained 2 epochs on a class-balanced 10,000-image subset
          (squeeze.max_per_class = 1000), recovery T = 120 - 10 (i mod 8), a DiT-T/2 trained 1,500
          steps of 64 on all 50,000 training images, 50 DDIM steps, 300 candidate images per class
          for RDED and DPS (4 score draws), students width 0.25 for 100 epochs, 2 seeds.
          Measured on a 2-core CPU: about 5.5 hours in all, over the two-hour aim: the DiT about
          2.5 h (10.8 images/s), DPS's scoring 39 min, the two PRISM sets 42 min, each set's
          relabel and two students about 2.5 min, the hard-label run 30 min, small_full 10 min
  smoke   seconds-scale wiring check (tiny widths, 8 iterations, 2 epochs)
  large   the paper-scale recipe shrunk only where CIFAR-10 needs it (an accelerator is advisable):
          full-width teachers 60 epochs on all 50,000 images, T = 1000 - 125 (i mod 8), students
          300 epochs, 3 seeds, a DiT-S/2 trained 100,000 steps of 256. Expected cost on one H100
          (estimate): teachers 2-3 h, the DiT 3-4 h, the rest under 1 h.
"""

from __future__ import annotations

from configs import common, presets

NUM_CLASSES = 10
TEACHERS = ("resnet18", "mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5", "alexnet")
METHODS = ("random_real", "random_real_s1", "random_real_s2", "sre2l", "prism", "prism_intra", "rded", "dps", "dit",
           "dap")
RANDOM_SETS = ("random_real", "random_real_s1", "random_real_s2")  # three draws: the baseline's spread (IOR)
DIFFUSION_METHODS = ("dps", "dit", "dap")  # these need the DiT the diffusion stage trains
BUDGETS = {
    # squeeze: teacher width, images per class, epochs; recover: T (PRISM varies it by 1/8 steps);
    # train: student width, epochs, evaluation interval, seeds.
    # diffusion: DiT size, training steps and batch (pixel space); sampling steps; DPS/RDED candidates.
    # full: epochs and seeds of the full-data reference student (`<budget>_full`).
    "small": dict(teacher_width=0.25, max_per_class=1000, teacher_epochs=2, iterations=120, iteration_step=10,
                  student_width=0.25, student_epochs=100, eval_every=50, seeds=(0, 1),
                  dit="T/2", dit_steps=1500, dit_batch=64, sample_steps=50, mipc=300, n_draws=4,
                  full_epochs=2, full_seeds=(0,)),
    "smoke": dict(teacher_width=0.125, max_per_class=50, teacher_epochs=1, iterations=8, iteration_step=1,
                  student_width=0.125, student_epochs=2, eval_every=1, seeds=(0,),
                  dit="T/2", dit_steps=4, dit_batch=16, sample_steps=4, mipc=40, n_draws=1,
                  full_epochs=1, full_seeds=(0,)),
    "large": dict(teacher_width=1.0, max_per_class=0, teacher_epochs=60, iterations=1000, iteration_step=125,
                  student_width=1.0, student_epochs=300, eval_every=25, seeds=(0, 1, 2),
                  dit="S/2", dit_steps=100_000, dit_batch=256, sample_steps=50, mipc=300, n_draws=8,
                  full_epochs=300, full_seeds=(0, 1, 2)),
}
ARGS = ("small", "small_hard", "small_ipc50", "large")


def make_config(budget: dict, *, ipc: int = 10, protocol: str = "prism", methods=METHODS,
                data_path: str = "data/cifar10", teachers=TEACHERS):
  """The comparison at `budget` (a BUDGETS entry or a dict of the same keys)."""
  config = common.base_config()
  config.stage = "all"
  config.seed = 0
  config.data = common.data_config(source="arrays", name="cifar10", path=data_path)
  config.progress_interval_s = 30.0
  sq = config.squeeze
  sq.teachers, sq.width, sq.epochs = tuple(teachers), budget["teacher_width"], float(budget["teacher_epochs"])
  sq.max_per_class = budget["max_per_class"]
  sq.warmup_epochs, sq.eval_every_epochs, sq.eval_batch_size = 0.5, 0.0, 500
  sq.checkpoint_every_steps, sq.log_every_steps = 200, 50
  # Shared recover settings; each recover method's preset goes on top (configs.common.add_method).
  common.set_recover_method(config, "prism")
  rc = config.recover
  rc.bn_pool = tuple(t for t in teachers if t != rc.logit_teacher)
  rc.k_max = min(rc.k_max, len(teachers))
  rc.ipc, rc.classes_per_batch = ipc, 10
  rc.iterations, rc.iteration_step = budget["iterations"], budget["iteration_step"]
  rc.iterations_per_call, rc.checkpoint_every_iterations = 40, 0
  rc.remat = False             # 32 px: memory is no concern
  config.image_sets = ()
  for method in methods:
    if method == "random_real":
      common.add_method(config, "random_real", "random_real")
    elif method.startswith("random_real_s"):
      common.add_method(config, method, "random_real", seed=int(method[len("random_real_s"):]))
    elif method == "prism_intra":
      common.add_method(config, method, method, logit_pool=rc.bn_pool)
    elif method == "rded":
      common.add_method(config, method, method, observer=rc.logit_teacher, mipc=budget["mipc"])
    elif method == "dps":
      common.add_method(config, method, method, mipc=budget["mipc"], n_draws=budget["n_draws"], feature_block=2)
    elif method == "dit":
      common.add_method(config, method, method, num_steps=budget["sample_steps"], per_device_batch=50)
    elif method == "dap":
      common.add_method(config, method, method, num_steps=budget["sample_steps"], per_device_batch=50,
                        feature_block=2)
    else:
      common.add_method(config, method, method)
  if any(m in DIFFUSION_METHODS for m in methods):
    dc = config.diffusion   # a pixel-space DiT on the training split (the diffusion stage)
    dc.model, dc.steps, dc.batch_size = budget["dit"], budget["dit_steps"], budget["dit_batch"]
    dc.learning_rate = 1e-4 if budget["dit"] != "T/2" else 1e-3  # the tiny model trains faster at 1e-3
    dc.ema_decay = 0.9999 if budget["dit_steps"] >= 50_000 else 0.999
    dc.log_every_steps, dc.checkpoint_every_steps = 100, 500
    dc.sample_steps = budget["sample_steps"]
  config.evaluate.random_sets = tuple(m for m in RANDOM_SETS if m in methods)
  common.set_protocol(config, protocol)
  relabel_teachers = tuple(t for t in config.relabel.teachers if t in teachers) or tuple(teachers[:1])
  if protocol != "hard_label":
    config.relabel.teachers = relabel_teachers
  tr = config.train
  if tr.batch_size > NUM_CLASSES * ipc:  # hard_label's batch 128 on IPC 10's 100 images: the soft protocol's 50
    tr.batch_size, tr.accumulation = NUM_CLASSES * ipc // 2, 1
  tr.width, tr.epochs, tr.eval_every_epochs = budget["student_width"], budget["student_epochs"], float(budget["eval_every"])
  tr.seeds, tr.eval_batch_size, tr.log_every_steps = tuple(budget["seeds"]), 500, 50
  return config


FULL_IPC = 5000  # every CIFAR-10 training image


def full_data_config(budget: dict):
  """The full-data reference of DD-Ranking's HLR: a student trained on the whole training split
  under hard labels with the budget's student settings except the epochs and seeds
  (`full_epochs`, `full_seeds`: `small` trains 2 epochs of the 50,000 images, 100,000 samples,
  since its 100 epochs would take about 9 hours on a 2-core CPU) (`<budget>_full`, e.g.
  `small_full`); its top-1 is `evaluate.full_data_top1` of the comparison."""
  config = make_config(budget, ipc=FULL_IPC, protocol="hard_label", methods=())
  config.train.epochs, config.train.seeds = int(budget["full_epochs"]), tuple(budget["full_seeds"])
  config.train.eval_every_epochs = float(budget["full_epochs"])
  config.stage = "distill,train"  # hard labels: no teachers; the 50,000-image set needs no evaluate report
  config.image_sets = ()
  common.add_method(config, "full_real", "random_real", ipc=FULL_IPC)
  config.evaluate.random_sets = ()
  return config


def reuse_sets(config, source: str, methods=METHODS):
  """The same comparison on the finished sets of another run (`source`, a work directory of this
  config): no squeeze, diffusion or distill; the sets are read as directories and relabeled and
  trained on under this config's protocol (the hard-label table on the soft-label run's sets)."""
  config.stage = "relabel+"
  config.teachers_dir = f"{source}/teachers"
  config.image_sets = tuple(f"{source}/recover" if m == "recover" else f"{source}/sets/{m}/distill" for m in methods)
  config.methods = type(config.methods)()
  return config


def get_config(arg: str | None = None):
  source = None
  if arg and "@" in arg:  # 'small_hard@workdirs/c10_compare': reuse that run's sets
    arg, source = arg.split("@", 1)
  if arg and arg.endswith("_full") and arg[:-len("_full")] in BUDGETS:
    return full_data_config(BUDGETS[arg[:-len("_full")]])
  arg = presets.choose(arg, ARGS, "configs/cifar10_compare.py")
  hard = arg.endswith("_hard")
  arg = arg[:-len("_hard")] if hard else arg
  budget, _, ipc = arg.partition("_ipc")
  config = make_config(BUDGETS[budget], ipc=int(ipc or 10), protocol="hard_label" if hard else "prism")
  return reuse_sets(config, source) if source else config
