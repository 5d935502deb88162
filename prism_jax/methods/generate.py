"""Generation methods (SPEC 13): `dit`, plain class-conditional DDIM sampling with classifier-free
guidance (DAP's diffusion baseline), and `dap`, the same sampler steered by the representativeness
prior of prism_jax/diffusion/guidance.py during the first `guide_fraction` of the steps.

Units are (class, IPC index) pairs, class-major, run in batches of `per_device_batch` x devices
sharded over the mesh; each finished batch is kept (units/batch_NNNNN.npz), so a killed run resumes
per batch. Sample (c, i) starts from x_T = normal(fold_in(key(seed, c, i), 0)) and takes η noise from
the same key, so it does not depend on the batch it ran in or on the device count. DAP's references:
`real_per_class` training images of each class (a seeded draw), encoded once (VAE or pixels), noised
at step s with noise drawn from (seed, class, s).

The steps are driven from the host (one dispatch per step for ε, one for the guidance, one for the
update): the guided ε is the plain ε plus λ √(1 − ᾱ_t) ∇E computed by a separate program, so λ = 0
gives the `dit` samples exactly.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from prism_jax import errors
from prism_jax.diffusion import grids, guidance, prior as prior_lib, sampling
from prism_jax.io import monitoring
from prism_jax.methods import base, units
from prism_jax.parallel import mesh as mesh_lib, multihost
from prism_jax.train import precision

DEFAULT_STEPS = 50
DEFAULT_CFG = 4.0          # the official DiT sampler's scale


def needs_diffusion_model(config, field: str, method: str) -> None:
  dc = config.diffusion
  if not dc.model and not dc.import_dir:
    raise errors.ConfigError(f"{field}: method '{method}' needs a diffusion model: set config.diffusion.model (the "
                             "diffusion stage trains a DiT on the data) or config.diffusion.import_dir (an imported "
                             "DiT, e.g. DiT-XL/2 with config.diffusion.vae_dir)")


def check_feature_block(block: int, prior, field: str) -> None:
  if not 1 <= block <= prior.model.depth:
    raise errors.ConfigError(f"{field}.feature_block={block}: the DiT in {prior.model_dir} has {prior.model.depth} "
                             f"blocks; expected 1..{prior.model.depth}")


# Programs, shared by every call with the same model (jit caches them by the static arguments).

@functools.partial(jax.jit, static_argnames=("model", "null_label", "cfg_scale", "guided_channels"))
def _cfg_eps(variables, x, labels, t, *, model, null_label, cfg_scale, guided_channels):
  t_batch = jnp.full((x.shape[0],), t, jnp.int32)
  return sampling.cfg_eps(lambda a, b, c: model.apply(variables, a, b, c), x, t_batch, labels, null_label,
                          cfg_scale, model.in_channels, guided_channels)


@functools.partial(jax.jit, static_argnames=("eta",), donate_argnums=(0,))
def _update(x, eps, noise_keys, step_index, t, t_prev, schedule, *, eta):
  noise = sampling.step_noise(noise_keys, step_index, x) if eta > 0 else None
  return sampling.ddim_step(schedule, x, eps.astype(x.dtype), t, t_prev, eta, noise)[0]


@functools.partial(jax.jit, static_argnames=("model", "kernel", "feature_block"))
def _guide(variables, x, labels, t, eps, refs_phi, sigma, scale, schedule, *, model, kernel, feature_block):
  t_batch = jnp.full((x.shape[0],), t, jnp.int32)
  e, grad = guidance.energy_and_grad(model, variables, x, t_batch, labels, refs_phi, sigma, kernel=kernel,
                                     feature_block=feature_block)
  return guidance.guide_eps(eps, grad, schedule.alphas_cumprod[t], scale), e


@functools.partial(jax.jit, static_argnames=("model", "feature_block", "rbf"))
def _references(variables, refs, noise_keys, labels, t, sigma, schedule, *, model, feature_block, rbf):
  """(K, M, D) reference features and (K,) bandwidths of K classes' references at timestep t."""
  def one(r, key, y):
    noise = jax.random.normal(key, r.shape, jnp.float32)
    phi = guidance.reference_features(model, variables, r, t, noise, y, schedule, feature_block)
    s = guidance.median_bandwidth(phi) if rbf else jnp.float32(1.0)
    return phi, jnp.where(sigma > 0, sigma, s)
  return jax.vmap(one)(refs, noise_keys, labels)


@functools.partial(jax.jit, static_argnames=("shape",))
def _initial(keys, *, shape):
  return sampling.initial_noise(keys, shape), jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)


class DitMethod(base.Method):
  name = "dit"
  description = "class-conditional DiT samples (DDIM + classifier-free guidance)"

  def default_settings(self, config):
    c = ml_collections.ConfigDict()
    c.ipc = int(config.recover.ipc)
    c.num_steps = DEFAULT_STEPS      # DDIM steps
    c.cfg_scale = DEFAULT_CFG        # classifier-free guidance scale (1 = none)
    c.eta = 0.0                      # DDIM η (0 = deterministic)
    c.guided_channels = -1           # -1 = CFG on every channel; 3 = the official DiT sampler's variant
    c.per_device_batch = 8           # samples per device of one batch
    c.seed = -1                      # -1 = the run's seed
    return c

  def validate(self, settings, config, field):
    needs_diffusion_model(config, field, self.name)
    for name in ("ipc", "num_steps", "per_device_batch"):
      if not isinstance(settings[name], int) or settings[name] < 1:
        raise errors.ConfigError(f"{field}.{name}={settings[name]!r}: expected an integer >= 1")
    if settings.num_steps > 1000:
      raise errors.ConfigError(f"{field}.num_steps={settings.num_steps}: expected at most 1000 (the training steps)")
    if not settings.cfg_scale >= 0:
      raise errors.ConfigError(f"{field}.cfg_scale={settings.cfg_scale!r}: expected >= 0 (1 = no guidance)")
    if not settings.eta >= 0:
      raise errors.ConfigError(f"{field}.eta={settings.eta!r}: expected >= 0")
    if settings.guided_channels != -1 and settings.guided_channels < 1:
      raise errors.ConfigError(f"{field}.guided_channels={settings.guided_channels!r}: expected -1 (all) or >= 1")
    if settings.seed < -1:
      raise errors.ConfigError(f"{field}.seed={settings.seed!r}: expected -1 (the run's seed) or >= 0")

  def resolved(self, ctx) -> dict:
    s = ctx.settings
    return {"ipc": int(s.ipc), "num_steps": int(s.num_steps), "cfg_scale": float(s.cfg_scale), "eta": float(s.eta),
            "guided_channels": int(s.guided_channels), "seed": ctx.config.seed if s.seed == -1 else int(s.seed)}

  def fingerprint(self, ctx):
    return {self.name: self.resolved(ctx), "prior": prior_lib.variables_fingerprint(ctx.workdir),
            "data": ctx.dataset.fingerprint(), **precision.resolve(ctx.config, "recover").fingerprint()}

  def plan(self, ctx):
    prior = prior_lib.load(ctx.workdir, ctx.dataset)
    r = self.resolved(ctx)
    if r["guided_channels"] > prior.model.in_channels:
      raise errors.ConfigError(f"{ctx.request.field}.guided_channels={r['guided_channels']}: the DiT has "
                               f"{prior.model.in_channels} channels")
    return r, prior

  # -- sampling ---------------------------------------------------------------------------------

  def guidance_setup(self, ctx, r, prior):
    """Per-run state of the guidance (DAP); None for plain sampling."""
    return None

  def sample_batch(self, ctx, r, prior, guide, units_ci: np.ndarray, placed, width: int) -> dict:
    """Images (uint8) and per-sample records of one batch of (class, ipc) units (padded to `width`)."""
    mesh = ctx.mesh
    count = len(units_ci)
    padded = np.concatenate([units_ci, np.repeat(units_ci[-1:], width - count, axis=0)])
    keys = units.unit_keys(r["seed"], "generate/sample", padded)  # the same x_T for dit and dap
    labels = prior.model_labels(padded[:, 0])
    local = mesh_lib.local_batch_slice(width, mesh)
    keys_d = mesh_lib.put_global_batch(keys[local], width, mesh)
    labels_d = mesh_lib.put_global_batch(labels[local], width, mesh)
    x, noise_keys = _initial(keys_d, shape=prior.shape)
    timesteps, prev = sampling.ddim_timesteps(prior.schedule.num_timesteps, r["num_steps"])
    gc = None if r["guided_channels"] in (-1, prior.model.in_channels) else r["guided_channels"]
    energies = []
    for step, (t, t_prev) in enumerate(zip(timesteps, prev)):
      t, t_prev = np.int32(t), np.int32(t_prev)
      eps = _cfg_eps(placed["dit"], x, labels_d, t, model=prior.model, null_label=prior.null_label,
                     cfg_scale=r["cfg_scale"], guided_channels=gc)
      if guide is not None and step <= guide["steps"]:
        guided, e = self.guide_step(ctx, r, prior, guide, placed, x, labels_d, padded[:, 0], step, t, eps)
        energies.append(units.to_host(placed["replicate"](e)))  # every row, also with several processes
        if step < guide["steps"]:
          eps = guided
      x = _update(x, eps, noise_keys, np.int32(step), t, t_prev, prior.schedule, eta=r["eta"])
    decoded = placed["decode"](placed["vae"], x)
    out = {"images": grids.to_uint8(units.to_host(decoded))[:count]}
    if energies:
      out["energy"] = np.stack(energies, axis=1)[:count]
    return out

  def guide_step(self, ctx, r, prior, guide, placed, x, labels_d, classes, step, t, eps):
    raise NotImplementedError

  def run(self, ctx, planned):
    r, prior = planned
    dataset, mesh = ctx.dataset, ctx.mesh
    policy = precision.resolve(ctx.config, "recover")
    width = int(ctx.settings.per_device_batch) * mesh.devices.size
    pairs = np.array([(c, i) for c in range(dataset.num_classes) for i in range(r["ipc"])], np.int32)
    batches = [pairs[s:s + width] for s in range(0, len(pairs), width)]
    placed = {"dit": mesh_lib.replicate(prior.variables, mesh), "vae": mesh_lib.replicate(prior.vae_variables, mesh),
              "decode": jax.jit(prior.decode, out_shardings=mesh_lib.replicated(mesh)),
              "replicate": jax.jit(lambda a: a, out_shardings=mesh_lib.replicated(mesh))}
    store = units.Units(ctx.unit_dir, ctx.tag)
    guide = self.guidance_setup(ctx, r, prior)
    progress = monitoring.Progress(ctx.tag, len(batches), unit="batch", items_per_step=width, item_unit="img",
                                   interval_s=ctx.config.progress_interval_s)
    print(f"[{ctx.tag}] {self.name}: {len(pairs)} samples ({r['ipc']} per class) in {len(batches)} batches of "
          f"{width}, {r['num_steps']} DDIM steps, CFG {r['cfg_scale']}"
          + (f", guidance {guide['describe']}" if guide else ""), flush=True)
    start, results = time.perf_counter(), []
    for b, batch in enumerate(batches):
      identity = f"{self.name} batch {b}: " + ",".join(f"{c}:{i}" for c, i in batch)
      with policy.scope():
        results.append(store.get_or_make(f"batch_{b:05d}", identity,
                                         lambda batch=batch: self.sample_batch(ctx, r, prior, guide, batch, placed,
                                                                               width)))
      progress.update(b + 1)
    meta = {"num_images": len(pairs), "class_names": list(dataset.class_names), "units_reused": store.reused}
    if multihost.is_main_process():
      self._write(ctx, r, guide, pairs, {k: np.concatenate([u[k] for u in results]) for k in results[0]})
      meta["wall_seconds_last_run"] = time.perf_counter() - start
    return meta

  def manifest_fields(self, r, guide, row: dict) -> dict:
    return {}

  def _write(self, ctx, r, guide, pairs, rows):
    dataset = ctx.dataset
    order = np.lexsort((pairs[:, 0], pairs[:, 1]))  # (ipc index, class)
    timesteps = sampling.ddim_timesteps(1000, r["num_steps"])[0]
    manifest = []
    for j in order:
      c, i = (int(v) for v in pairs[j])
      record = {"class": c, "class_name": dataset.class_names[c], "ipc_index": i, "method": self.name,
                "seed": r["seed"], "num_steps": r["num_steps"], "cfg_scale": r["cfg_scale"], "eta": r["eta"],
                "timesteps": [int(timesteps[0]), int(timesteps[-1])]}
      record.update(self.manifest_fields(r, guide, {k: v[j] for k, v in rows.items()}))
      manifest.append(record)
    base.write_set(ctx, rows["images"][order], pairs[order, 0], pairs[order, 1], manifest)


class DapMethod(DitMethod):
  name = "dap"
  description = "DAP: DiT sampling guided by the representativeness prior of its own features"

  def default_settings(self, config):
    c = super().default_settings(config)
    c.feature_block = 8          # features: tokens after this many DiT blocks (the paper: blocks 4-12 best)
    c.kernel = "linear"          # linear | rbf
    c.rbf_sigma = -1.0           # rbf bandwidth; <= 0: the median heuristic per class and step
    c.scale = 10.0               # λ
    c.guide_fraction = 0.5       # guidance on the first fraction of the steps (early stop)
    c.real_per_class = 50        # M real references per class
    return c

  def validate(self, settings, config, field):
    super().validate(settings, config, field)
    if settings.kernel not in guidance.KERNELS:
      raise errors.ConfigError(f"{field}.kernel={settings.kernel!r}: expected one of {guidance.KERNELS}")
    if not settings.scale >= 0:
      raise errors.ConfigError(f"{field}.scale={settings.scale!r}: expected >= 0 (0 = the plain dit samples)")
    if not 0 <= settings.guide_fraction <= 1:
      raise errors.ConfigError(f"{field}.guide_fraction={settings.guide_fraction!r}: expected a value in [0, 1]")
    for name in ("feature_block", "real_per_class"):
      if not isinstance(settings[name], int) or settings[name] < 1:
        raise errors.ConfigError(f"{field}.{name}={settings[name]!r}: expected an integer >= 1")
    if settings.kernel == "rbf" and settings.real_per_class < 2 and settings.rbf_sigma <= 0:
      raise errors.ConfigError(f"{field}.real_per_class={settings.real_per_class}: the median bandwidth needs >= 2 "
                               "references (or set rbf_sigma > 0)")

  def resolved(self, ctx):
    s = ctx.settings
    return {**super().resolved(ctx), "feature_block": int(s.feature_block), "kernel": s.kernel,
            "rbf_sigma": float(s.rbf_sigma), "scale": float(s.scale), "guide_fraction": float(s.guide_fraction),
            "real_per_class": int(s.real_per_class)}

  def plan(self, ctx):
    r, prior = super().plan(ctx)
    check_feature_block(r["feature_block"], prior, ctx.request.field)
    per_class = [len(ix) for ix in ctx.dataset.class_indices("train")]
    smallest = int(np.argmin(per_class))
    if per_class[smallest] < r["real_per_class"]:
      raise errors.ConfigError(
          f"{ctx.request.field}.real_per_class={r['real_per_class']}: class {smallest} "
          f"('{ctx.dataset.class_names[smallest]}') has only {per_class[smallest]} training images")
    return r, prior

  def guidance_setup(self, ctx, r, prior):
    steps = sampling.num_guided_steps(r["num_steps"], r["guide_fraction"])
    encode = units.compile_rows(lambda v, b: {"z": prior.encode(v, b["x"])}, ctx.mesh)
    return {"steps": steps, "refs": {}, "phi": {}, "encode": encode,
            "timesteps": sampling.ddim_timesteps(1000, r["num_steps"])[0],
            "describe": f"λ {r['scale']} on {steps}/{r['num_steps']} steps ({r['kernel']} kernel, block "
                        f"{r['feature_block']}, {r['real_per_class']} references per class)"}

  def _class_references(self, ctx, r, prior, guide, placed, klass: int) -> np.ndarray:
    """The class's references, encoded once (one compiled encoder for the whole run)."""
    cache = guide["refs"]
    if klass not in cache:
      pool = ctx.dataset.class_indices("train")[klass]
      chosen = np.sort(units.unit_rng(r["seed"], "dap/references", klass).permutation(pool)[:r["real_per_class"]])
      images = ctx.dataset.read("train", chosen)
      cache[klass] = units.map_rows(None, placed["vae"], {"x": images}, ctx.mesh, per_device=16,
                                    jitted=guide["encode"])["z"]
    return cache[klass]

  def _class_features(self, ctx, r, prior, guide, placed, klass: int, step: int, t) -> tuple:
    """(Φ (M, D), σ) of one class at one step: computed class by class (the same program whatever
    the batch holds, so the result does not depend on the device count) and kept while the class's
    samples run."""
    key = (klass, step)
    if key not in guide["phi"]:
      refs = self._class_references(ctx, r, prior, guide, placed, klass)[None]
      noise_key = units.unit_keys(r["seed"], "dap/reference_noise", np.array([(klass, step)]))
      phi, sigma = _references(placed["dit"], refs, noise_key, prior.model_labels([klass]), t,
                               np.float32(r["rbf_sigma"]), prior.schedule, model=prior.model,
                               feature_block=r["feature_block"], rbf=r["kernel"] == "rbf")
      guide["phi"][key] = (np.asarray(units.to_host(phi))[0], np.asarray(units.to_host(sigma))[0])
    return guide["phi"][key]

  def guide_step(self, ctx, r, prior, guide, placed, x, labels_d, classes, step, t, eps):
    distinct = sorted(set(int(c) for c in classes))
    for cache in (guide["refs"], guide["phi"]):  # units are class-major: classes before this batch are done
      for old in [k for k in cache if (k if isinstance(k, int) else k[0]) < distinct[0]]:
        del cache[old]
    features = {c: self._class_features(ctx, r, prior, guide, placed, c, step, t) for c in distinct}
    mesh, width = ctx.mesh, len(classes)
    local = mesh_lib.local_batch_slice(width, mesh)
    per_phi = np.stack([features[int(c)][0] for c in classes])
    per_sigma = np.array([features[int(c)][1] for c in classes], np.float32)
    per_phi = mesh_lib.put_global_batch(per_phi[local], width, mesh)
    per_sigma = mesh_lib.put_global_batch(per_sigma[local], width, mesh)
    return _guide(placed["dit"], x, labels_d, t, eps, per_phi, per_sigma, np.float32(r["scale"]), prior.schedule,
                  model=prior.model, kernel=r["kernel"], feature_block=r["feature_block"])

  def manifest_fields(self, r, guide, row):
    energy = [float(v) for v in row["energy"]]
    return {"guidance_scale": r["scale"], "guide_fraction": r["guide_fraction"], "guided_steps": guide["steps"],
            "kernel": r["kernel"], "feature_block": r["feature_block"], "real_per_class": r["real_per_class"],
            "energy_before": energy[0], "energy_after": energy[-1], "energy": energy}
