"""Diffusion benchmark: DDIM+CFG sampling throughput against diffusers, DiT training steps, XL/2 memory.

  python benchmarks/diffusion.py --out bench_out/diffusion.json                 # everything
  python benchmarks/diffusion.py --parts sampling --models S/2,B/2 --batch 2 --steps 50
  python benchmarks/diffusion.py --parts sampling --dtypes float32,bfloat16     # also bf16 compute in both
  python benchmarks/diffusion.py --parts gemm --models B/2                      # matrix kernels alone
  python benchmarks/diffusion.py --parts train,memory --out bench_out/diffusion_mem.json
  taskset -c 0-3 python benchmarks/diffusion.py ...     # pin both frameworks to the same cores

Parts:
  sampling  images/s of class-conditional DDIM sampling (default 50 steps, classifier-free guidance
            scale 4: every step evaluates the model once on the doubled batch [x; x] with labels
            [y; null]) of DiT-S/2 and DiT-B/2 at 256 px (32x32x4 latents, 1000 classes), random
            weights. prism_jax two ways: `sample_class_conditional` with the whole 50-step loop (one
            lax.scan) jitted ('scan', the accelerator form), and `sample_class_conditional_host`, one
            jitted guided DDIM step driven from Python ('host', the CPU default: XLA:CPU runs a model
            inside a loop body slower); compile time is reported apart and excluded. PyTorch: diffusers'
            DiTTransformer2DModel holding the same weights (the random torch model is converted to
            ours with `dit_import.state_dict_to_variables`, layout 'diffusers', timestep_freq_shift=1 so
            the two forwards match exactly) and DDIMScheduler (linear betas 1e-4..0.02,
            set_alpha_to_one, steps_offset 0, clip_sample False, 'leading' spacing), driven by the
            loop of diffusers' DiTPipeline written out (the pipeline itself cannot run without a VAE
            and draws its own noise): doubled batch, guidance on all latent channels (prism_jax:
            guided_channels=None; diffusers' pipeline also guides all 4 channels, unlike the official
            sampler's 3), scheduler.step on the doubled batch, torch.inference_mode. Both start from
            the same x_T (prism_jax's `initial_noise`); the max abs / relative difference of the two
            final samples checks that the comparison compares the same computation. Also reported:
            one model evaluation on the doubled batch (ms) in each framework, to separate the model
            from the loop.
  gemm      GFLOP/s of the four matrix products of one DiT block (qkv, proj, mlp.fc1, mlp.fc2 on all
            tokens of the CFG model batch) for each --models size, XLA:CPU against torch.mm on the same
            threads, float32 and bfloat16: the kernels alone, apart from anything the model code decides.
  train     training steps/s and images/s of `training.train_step` (jitted, state donated) for the tiny
            pixel-space DiT 'T/2' (32 px, 3 channels, 10 classes, learn_sigma with the VLB term),
            batch 64, AdamW + EMA.
  memory    XLA's compiled memory analysis (temp / argument / output bytes; compile only, nothing is
            allocated or run) of DiT-XL/2 at 256 px with --mem-batch 50 images: one CFG model
            evaluation (batch 100) and one whole DDIM step (CFG evaluation + update), lowered from
            `abstract_variables` (jax.eval_shape). Each compile runs in a child process with a
            --mem-timeout (default 180 s) limit, so an over-long compile is reported, not waited on.

Threads: PyTorch gets torch.set_num_threads(len(os.sched_getaffinity(0))), the number of CPUs XLA's
CPU thread pool uses. Timings are medians over --repeats runs after a warm-up; on a shared machine they
are noisy (other load hurts PyTorch's multi-threaded kernels and XLA's alike, but not equally).
"""

from __future__ import annotations

# torch first: anything importing TensorFlow before torch can break torch's CPU kernels.
import torch  # noqa: I001

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from prism_jax import runtime  # noqa: E402
from prism_jax.diffusion import dit, dit_import, sampling, training  # noqa: E402
from prism_jax.diffusion.schedule import DiffusionSchedule  # noqa: E402

LATENT_SIZE, LATENT_CHANNELS, IMAGENET_CLASSES = 32, 4, 1000
CFG_SCALE = 4.0
GiB = 1024 ** 3


def _usable_cpus() -> int:
  """CPUs this process may run on (respects `taskset`, as XLA's CPU thread pool does)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _median_seconds(fn, repeats: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


# ---------------------------------------------------------------------------------------------- sampling


def random_diffusers_dit(name: str, seed: int = 0):
  """diffusers' DiTTransformer2DModel of size `name` at 256 px with every parameter random (its own
  init zeroes the adaLN-Zero layers, which would make the output identically 0) and the per-block
  timestep/label embedder copies tied to block 0's, as in the public checkpoints."""
  from diffusers import DiTTransformer2DModel

  size = dit.DIT_SIZES[name.split("/")[0]]
  patch = int(name.split("/")[1])
  torch.manual_seed(seed)
  model = DiTTransformer2DModel(
      num_attention_heads=size["num_heads"], attention_head_dim=size["hidden_size"] // size["num_heads"],
      in_channels=LATENT_CHANNELS, out_channels=2 * LATENT_CHANNELS, num_layers=size["depth"],
      sample_size=LATENT_SIZE, patch_size=patch, num_embeds_ada_norm=IMAGENET_CLASSES, norm_eps=1e-6)
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for pname, param in model.named_parameters():
      if pname.endswith("embedding_table.weight"):
        param.copy_(torch.randn(param.shape, generator=gen))
      elif param.ndim >= 2:
        # 1/sqrt(fan_in), and small for the residual-branch gates so depth does not blow activations up.
        scale = 0.25 if pname.endswith("norm1.linear.weight") else 1.0
        param.copy_(scale * torch.randn(param.shape, generator=gen) / param[0].numel() ** 0.5)
      else:
        param.copy_(0.02 * torch.randn(param.shape, generator=gen))
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
      block.norm1.emb.load_state_dict(first)
  return model.eval()


def torch_ddim_cfg(model, scheduler, x_T: torch.Tensor, labels: torch.Tensor, num_steps: int,
                   guidance_scale: float = CFG_SCALE) -> torch.Tensor:
  """The denoising loop of diffusers' DiTPipeline.__call__ (guidance_scale > 1), without the VAE and
  with a given x_T: doubled batch, CFG on all latent channels, scheduler step on the doubled batch."""
  batch = x_T.shape[0]
  channels = model.config.in_channels
  latent_model_input = torch.cat([x_T] * 2)
  class_labels_input = torch.cat([labels, torch.full_like(labels, IMAGENET_CLASSES)], 0)
  scheduler.set_timesteps(num_steps)
  for t in scheduler.timesteps:
    half = latent_model_input[: len(latent_model_input) // 2]
    latent_model_input = torch.cat([half, half], dim=0)
    latent_model_input = scheduler.scale_model_input(latent_model_input, t)
    timesteps = t[None].expand(latent_model_input.shape[0])
    noise_pred = model(latent_model_input, timestep=timesteps, class_labels=class_labels_input).sample.float()
    eps, rest = noise_pred[:, :channels], noise_pred[:, channels:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    noise_pred = torch.cat([eps, rest], dim=1)
    model_output, _ = torch.split(noise_pred, channels, dim=1)
    latent_model_input = scheduler.step(model_output, t, latent_model_input).prev_sample
  return latent_model_input[:batch]


def ddim_scheduler():
  from diffusers import DDIMScheduler

  return DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                       set_alpha_to_one=True, steps_offset=0, clip_sample=False, prediction_type="epsilon",
                       timestep_spacing="leading")


def sample_one_model(name: str, batch: int, steps: int, repeats: int, dtype: str = "float32") -> dict:
  """One row of the sampling table. dtype 'bfloat16': prism_jax's compute dtype (float32 parameters,
  bf16 matrix products, float32 norms, softmax statistics, output and DDIM update) against torch's
  CPU autocast to bf16 around the same float32 model (the same split: bf16 matrix products, float32
  elsewhere; the model output cast to float32 before the scheduler). prism_jax's parameters are cast
  to bf16 once, before sampling."""
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype={dtype!r}: expected 'float32' or 'bfloat16'")
  autocast = (functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16) if dtype == "bfloat16"
              else contextlib.nullcontext)
  torch_model = random_diffusers_dit(name)
  state_dict = {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}
  spec = dict(dit.dit_spec(name, input_size=LATENT_SIZE, in_channels=LATENT_CHANNELS,
                           num_classes=IMAGENET_CLASSES), timestep_freq_shift=1)
  model = dit.create_dit(spec, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
  variables = jax.device_put(dit_import.state_dict_to_variables(state_dict, spec, "diffusers"))
  del state_dict
  if dtype == "bfloat16":
    # The same numbers as casting at every use (flax's promotion), done once: torch's autocast caches
    # its casts for the autocast region, here the whole loop.
    variables = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), variables)
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(variables))
  schedule = DiffusionSchedule.linear()
  shape = (LATENT_SIZE, LATENT_SIZE, LATENT_CHANNELS)
  example_keys = jax.random.split(jax.random.key(0), batch)
  labels = jnp.asarray(np.random.default_rng(0).integers(0, IMAGENET_CLASSES, batch), jnp.int32)

  def sample(variables, labels, example_keys):
    return sampling.sample_class_conditional(model.apply, variables, labels, example_keys, shape=shape,
                                             num_classes=IMAGENET_CLASSES, schedule=schedule,
                                             num_steps=steps, cfg_scale=CFG_SCALE)

  start = time.perf_counter()
  compiled = jax.jit(sample).lower(variables, labels, example_keys).compile()
  compile_s = time.perf_counter() - start
  jax_out = {}

  def run_jax():
    jax_out["x0"] = compiled(variables, labels, example_keys).block_until_ready()

  run_jax()  # warm-up (first execution)
  jax_s, jax_times = _median_seconds(run_jax, repeats)

  # The host-driven loop (the CPU default of the stages): one compiled guided DDIM step, called per step.
  def run_host():
    jax_out["x0_host"] = sampling.sample_class_conditional_host(
        model.apply, variables, labels, example_keys, shape=shape, num_classes=IMAGENET_CLASSES,
        schedule=schedule, num_steps=steps, cfg_scale=CFG_SCALE).block_until_ready()

  run_host()  # warm-up (compiles the step)
  host_s, host_times = _median_seconds(run_host, repeats)
  host_diff = float(np.max(np.abs(np.asarray(jax_out["x0_host"]) - np.asarray(jax_out["x0"]))))

  # One model evaluation on the doubled batch, to separate the model from the loop.
  forward = jax.jit(model.apply)
  x2 = jnp.zeros((2 * batch,) + shape, jnp.float32) + 0.1
  t2 = jnp.full((2 * batch,), 500, jnp.int32)
  y2 = jnp.concatenate([labels, jnp.full_like(labels, IMAGENET_CLASSES)])
  forward(variables, x2, t2, y2).block_until_ready()
  jax_fwd_s, _ = _median_seconds(lambda: forward(variables, x2, t2, y2).block_until_ready(), 3)

  x_T = np.asarray(sampling.initial_noise(example_keys, shape))
  x_T_torch = torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())
  labels_torch = torch.from_numpy(np.asarray(labels).astype(np.int64))
  scheduler = ddim_scheduler()
  torch_out = {}
  with torch.inference_mode():
    x2_t = torch.from_numpy(np.asarray(x2).transpose(0, 3, 1, 2).copy())
    t2_t = torch.from_numpy(np.asarray(t2).astype(np.int64))
    y2_t = torch.from_numpy(np.asarray(y2).astype(np.int64))
    def fwd():
      with autocast():
        return torch_model(x2_t, timestep=t2_t, class_labels=y2_t).sample.float()

    fwd()  # warm-up
    torch_fwd_s, _ = _median_seconds(fwd, 3)
    fwd_diff = float(np.max(np.abs(fwd().numpy().transpose(0, 2, 3, 1)
                                   - np.asarray(forward(variables, x2, t2, y2)))))

    def run_torch():
      with autocast():
        torch_out["x0"] = torch_ddim_cfg(torch_model, scheduler, x_T_torch, labels_torch, steps)

    torch_s, torch_times = _median_seconds(run_torch, repeats)
  ref = torch_out["x0"].numpy().transpose(0, 2, 3, 1).astype(np.float64)
  diff = float(np.max(np.abs(np.asarray(jax_out["x0"], np.float64) - ref)))
  ref_max = float(np.max(np.abs(ref)))
  return {"model": f"DiT-{name}", "dtype": dtype, "params": num_params, "batch": batch, "steps": steps,
          "cfg_scale": CFG_SCALE, "model_batch": 2 * batch,
          "jax_compile_s": compile_s, "jax_s": jax_s, "jax_times_s": jax_times,
          "jax_images_per_s": batch / jax_s, "torch_s": torch_s, "torch_times_s": torch_times,
          "torch_images_per_s": batch / torch_s, "ratio_jax_over_torch": torch_s / jax_s,
          "jax_host_s": host_s, "jax_host_times_s": host_times, "jax_host_images_per_s": batch / host_s,
          "ratio_jax_host_over_torch": torch_s / host_s, "host_vs_scan_max_abs_diff": host_diff,
          "jax_forward_ms": 1e3 * jax_fwd_s, "torch_forward_ms": 1e3 * torch_fwd_s,
          "forward_max_abs_diff": fwd_diff,
          "sample_max_abs_diff": diff, "sample_max_abs": ref_max,
          "sample_rel_diff": diff / max(ref_max, 1e-30)}


def part_sampling(args) -> dict:
  threads = _usable_cpus()
  torch.set_num_threads(threads)
  rows = []
  print(f"  threads: torch {torch.get_num_threads()}, XLA CPU affinity {threads}", flush=True)
  print(f"  {'model':10} {'dtype':8} {'batch':>5} {'steps':>5} {'compile s':>9} {'scan s':>8} {'host s':>8} "
        f"{'torch s':>8} {'scan/torch':>10} {'host/torch':>10} {'fwd ms jax/torch':>17} "
        f"{'max|diff|':>9} {'rel':>8}", flush=True)
  for name in args.models.split(","):
    for dtype in args.dtypes.split(","):
      row = sample_one_model(name.strip(), args.batch, args.steps, args.repeats, dtype.strip())
      rows.append(row)
      print(f"  {row['model']:10} {dtype:8} {row['batch']:5d} {row['steps']:5d} {row['jax_compile_s']:9.1f} "
            f"{row['jax_s']:8.2f} {row['jax_host_s']:8.2f} {row['torch_s']:8.2f} "
            f"{row['ratio_jax_over_torch']:10.2f} {row['ratio_jax_host_over_torch']:10.2f} "
            f"{row['jax_forward_ms']:8.1f}/{row['torch_forward_ms']:<8.1f} "
            f"{row['sample_max_abs_diff']:9.2e} {row['sample_rel_diff']:8.1e}", flush=True)
  return {"threads": threads, "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
          "torch_loop": "DiTPipeline's loop written out (no VAE): doubled batch, CFG on all 4 latent "
                        "channels, DDIMScheduler.step on the doubled batch, torch.inference_mode",
          "jax_loop": "scan: sample_class_conditional (guided_channels=None), whole lax.scan jitted; host: "
                      "sample_class_conditional_host, one jitted guided DDIM step per step (the CPU default)",
          "rows": rows}


# ---------------------------------------------------------------------------------------------- gemm


def gemm_shapes(name: str, model_batch: int) -> list[tuple[str, int, int, int]]:
  """(layer, M, K, N) of the four token-wise matrix products of one DiT block at 256 px: M = tokens of
  the whole CFG model batch. They carry nearly all of a block's FLOPs (attention itself is ~5%)."""
  size = dit.DIT_SIZES[name.split("/")[0]]
  width, patch = size["hidden_size"], int(name.split("/")[1])
  rows = model_batch * (LATENT_SIZE // patch) ** 2
  return [("qkv", rows, width, 3 * width), ("proj", rows, width, width),
          ("mlp.fc1", rows, width, 4 * width), ("mlp.fc2", rows, 4 * width, width)]


def part_gemm(args) -> dict:
  """GFLOP/s of the blocks' matrix products alone, XLA:CPU against PyTorch on the same threads, in
  float32 and in bfloat16 (bf16 operands, float32 accumulation and result in XLA; bf16 in and out in
  torch): separates the matrix kernels from everything the model code controls."""
  threads = _usable_cpus()
  torch.set_num_threads(threads)
  product = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  rows = []
  print(f"  {'model':8} {'layer':8} {'M x K x N':>18} {'jax f32':>8} {'torch f32':>9} {'ratio':>6} "
        f"{'jax bf16':>8} {'torch bf16':>10} {'ratio':>6}   (GFLOP/s)", flush=True)
  for name in args.models.split(","):
    for layer, m, k, n in gemm_shapes(name.strip(), 2 * args.batch):
      rng = np.random.default_rng(0)
      a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
      flops = 2.0 * m * k * n
      row = {"model": f"DiT-{name.strip()}", "layer": layer, "m": m, "k": k, "n": n}
      for dtype, jdt, tdt in (("f32", jnp.float32, torch.float32), ("bf16", jnp.bfloat16, torch.bfloat16)):
        ja, jb = jnp.asarray(a, jdt), jnp.asarray(b, jdt)
        product(ja, jb).block_until_ready()
        jax_s, _ = _median_seconds(lambda: product(ja, jb).block_until_ready(), args.gemm_repeats)
        ta, tb = torch.from_numpy(a).to(tdt), torch.from_numpy(b).to(tdt)
        with torch.inference_mode():
          torch.mm(ta, tb)
          torch_s, _ = _median_seconds(lambda: torch.mm(ta, tb), args.gemm_repeats)
        row[f"jax_{dtype}_gflops"] = flops / jax_s / 1e9
        row[f"torch_{dtype}_gflops"] = flops / torch_s / 1e9
        row[f"ratio_{dtype}"] = torch_s / jax_s
      rows.append(row)
      print(f"  {row['model']:8} {layer:8} {f'{m} x {k} x {n}':>18} {row['jax_f32_gflops']:8.0f} "
            f"{row['torch_f32_gflops']:9.0f} {row['ratio_f32']:6.2f} {row['jax_bf16_gflops']:8.0f} "
            f"{row['torch_bf16_gflops']:10.0f} {row['ratio_bf16']:6.2f}", flush=True)
  return {"threads": threads, "repeats": args.gemm_repeats, "rows": rows}


# ---------------------------------------------------------------------------------------------- train


def part_train(args) -> dict:
  spec = dit.dit_spec("T/2", input_size=32, in_channels=3, num_classes=10)
  model = dit.create_dit(spec)
  params = dit.init_dit(model, jax.random.key(0))["params"]
  tx = training.make_optimizer()
  state = training.create_train_state(params, tx)
  schedule = DiffusionSchedule.linear()
  step = jax.jit(functools.partial(training.train_step, apply_fn=model.apply, schedule=schedule, tx=tx,
                                   num_classes=10, learn_sigma_loss=True), donate_argnums=0)
  rng = np.random.default_rng(0)
  batch = {"images": jnp.asarray(rng.uniform(-1, 1, (args.train_batch, 32, 32, 3)), jnp.float32),
           "labels": jnp.asarray(rng.integers(0, 10, args.train_batch), jnp.int32),
           "index": jnp.arange(args.train_batch, dtype=jnp.int32)}
  key = jax.random.key(1)
  start = time.perf_counter()
  compiled = step.lower(state, batch, key).compile()
  compile_s = time.perf_counter() - start
  state, metrics = compiled(state, batch, jax.random.fold_in(key, 0))  # warm-up
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for i in range(args.train_steps):
    state, metrics = compiled(state, batch, jax.random.fold_in(key, i + 1))
  jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - start
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
  row = {"model": "DiT-T/2", "params": num_params, "image": "32x32x3", "num_classes": 10,
         "batch": args.train_batch, "steps": args.train_steps, "compile_s": compile_s, "seconds": seconds,
         "steps_per_s": args.train_steps / seconds, "images_per_s": args.train_steps * args.train_batch / seconds,
         "final_loss": float(metrics["loss"])}
  print(f"  {row['model']} ({num_params:,} params) batch {row['batch']}: compile {compile_s:.1f} s, "
        f"{row['steps_per_s']:.2f} steps/s, {row['images_per_s']:.0f} images/s "
        f"({row['steps']} steps, loss {row['final_loss']:.3f})", flush=True)
  return row


# ---------------------------------------------------------------------------------------------- memory

MEMORY_ITEMS = ("cfg_eval", "ddim_step")


def memory_item(item: str, name: str, batch: int) -> dict:
  """Compiles one XL/2 program from abstract arguments and returns its memory analysis."""
  spec = dit.dit_spec(name, input_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, num_classes=IMAGENET_CLASSES)
  model = dit.create_dit(spec)
  variables = dit.abstract_variables(model)
  param_bytes = sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in jax.tree_util.tree_leaves(variables))
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(variables))
  schedule = DiffusionSchedule.linear()
  x = jax.ShapeDtypeStruct((batch, LATENT_SIZE, LATENT_SIZE, LATENT_CHANNELS), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  y = jax.ShapeDtypeStruct((batch,), jnp.int32)

  def eps_of(variables, x_t, t, y):
    return sampling.cfg_eps(lambda a, b, c: model.apply(variables, a, b, c), x_t, t, y, IMAGENET_CLASSES,
                            CFG_SCALE, LATENT_CHANNELS)

  if item == "cfg_eval":
    fn, abstract = eps_of, (variables, x, t, y)
  elif item == "ddim_step":
    def fn(variables, x_t, t, t_prev, y):
      eps = eps_of(variables, x_t, t, y)
      return sampling.ddim_step(schedule, x_t, eps, t, t_prev)[0]
    abstract = (variables, x, t, t, y)
  else:
    raise ValueError(f"memory item {item!r}: expected one of {MEMORY_ITEMS}")
  start = time.perf_counter()
  lowered = jax.jit(fn).lower(*abstract)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  row = {"item": item, "model": f"DiT-{name}", "images": batch, "model_batch": 2 * batch,
         "params": num_params, "param_bytes": param_bytes, "compile_s": compile_s}
  for field in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
                "alias_size_in_bytes", "generated_code_size_in_bytes"):
    row[field] = int(getattr(analysis, field, -1)) if analysis is not None else None
  return row


def part_memory(args) -> dict:
  rows = []
  print(f"  {'program':10} {'model':9} {'images':>6} {'temp GiB':>9} {'args GiB':>9} {'out GiB':>9} "
        f"{'params GiB':>10} {'compile s':>9}", flush=True)
  for item in args.mem_items.split(","):
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-item", item, "--mem-model", args.mem_model,
           "--mem-batch", str(args.mem_batch)]
    start = time.perf_counter()
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.mem_timeout)
    except subprocess.TimeoutExpired:
      row = {"item": item, "model": f"DiT-{args.mem_model}", "images": args.mem_batch,
             "error": f"compile did not finish within {args.mem_timeout} s (child killed)"}
    else:
      lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
      if proc.returncode == 0 and lines:
        row = json.loads(lines[-1])
      else:
        row = {"item": item, "model": f"DiT-{args.mem_model}", "images": args.mem_batch,
               "error": f"child exited with {proc.returncode}: {proc.stderr.strip()[-800:]}"}
    row["wall_s"] = time.perf_counter() - start
    rows.append(row)
    if "error" in row:
      print(f"  {item:10} {row['model']:9} {row['images']:6d}  FAILED: {row['error']}", flush=True)
    else:
      print(f"  {item:10} {row['model']:9} {row['images']:6d} {row['temp_size_in_bytes'] / GiB:9.3f} "
            f"{row['argument_size_in_bytes'] / GiB:9.3f} {row['output_size_in_bytes'] / GiB:9.4f} "
            f"{row['param_bytes'] / GiB:10.3f} {row['compile_s']:9.1f}", flush=True)
  return {"backend": jax.default_backend(), "rows": rows}


# ---------------------------------------------------------------------------------------------- main


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--parts", default="sampling,gemm,train,memory")
  parser.add_argument("--models", default="S/2,B/2", help="DiT sizes for the sampling part")
  parser.add_argument("--batch", type=int, default=2, help="images per sampling batch (model sees 2x)")
  parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
  parser.add_argument("--dtypes", default="float32", help="compute dtypes of the sampling part: float32,bfloat16")
  parser.add_argument("--repeats", type=int, default=2, help="timed sampling runs (median) after a warm-up")
  parser.add_argument("--gemm-repeats", type=int, default=20, help="timed products per GEMM (median)")
  parser.add_argument("--train-batch", type=int, default=64)
  parser.add_argument("--train-steps", type=int, default=20)
  parser.add_argument("--mem-model", default="XL/2")
  parser.add_argument("--mem-batch", type=int, default=50, help="images (the CFG model batch is twice this)")
  parser.add_argument("--mem-items", default=",".join(MEMORY_ITEMS))
  parser.add_argument("--mem-timeout", type=float, default=180.0, help="seconds per memory compile")
  parser.add_argument("--memory-item", default=None, help=argparse.SUPPRESS)  # child of part_memory
  parser.add_argument("--out", default="bench_out/diffusion.json")
  args = parser.parse_args()
  if args.memory_item:
    print(json.dumps(memory_item(args.memory_item, args.mem_model, args.mem_batch)), flush=True)
    return
  import diffusers

  result = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "jax": jax.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "cpu": platform.processor() or platform.machine(), "usable_cpus": _usable_cpus(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
  for part in args.parts.split(","):
    print(f"[{part}]", flush=True)
    result[part] = globals()[f"part_{part}"](args)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  runtime.configure_jax()
  main()
