"""DPS (dps-paper.txt 3, Algorithm 1; SPEC 12) as a method: a class-conditional DiT scores random crops
of real images by how class-typical they are, and a k-means over its own features keeps them diverse.

Per class (one unit, kept in units/class_NNNNN.npz):
  1. `mipc` training images (seeded draw), `num_crop` random-resized crops of each (boxes as RDED's,
     drawn per (seed, class, image)), each resized to the image size and encoded (VAE, or pixels);
  2. R(z | y) = mean over `n_draws` paired draws (t uniform in t_range x 1000, one ε per draw for both
     terms) of ‖ε_θ(z_t, t, y) − ε‖² − ‖ε_θ(z_t, t, ∅) − ε‖²; a low R is class-typical (eq. 5-6).
     Each image keeps its crop with the lowest R (`select='min'`; 'max' is Algorithm 1 as printed);
  3. features: the DiT's tokens after block `feature_block`, mean-pooled, of the kept crop noised to
     `feature_t` (seeded ε), label y;
  4. k-means (`clusters`, seeded) over the kept crops; clusters ranked by median R (lowest first),
     members by distance to the centroid; IPC x factor² crops filled round-robin from the top
     `top_clusters` clusters (patches/cluster.py);
  5. factor 2 (the default for IPC <= 10): image t stitches picks k * IPC + t (RDED's order), each
     resized to half the image size; factor 1: one pick per image.
The manifest records each cell's training index, crop box, R, cluster and ranks.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from prism_jax import errors
from prism_jax.diffusion import guidance, prior as prior_lib
from prism_jax.diffusion import schedule as schedule_lib
from prism_jax.diffusion.schedule import split_model_output
from prism_jax.methods import base, generate, rded, units
from prism_jax.parallel import mesh as mesh_lib
from prism_jax.patches import cluster as cluster_lib
from prism_jax.patches import crops as crops_lib
from prism_jax.train import precision

NAME = "dps"
STITCH_MAX_IPC = 10   # factor -1: 2 (four crops per image) up to this IPC, else 1


def representativeness(model, variables, z: jax.Array, y: jax.Array, null_label: int, keys: jax.Array,
                       schedule: schedule_lib.DiffusionSchedule, n_draws: int, t_range) -> jax.Array:
  """R (B,) of inputs z (B, H, W, C) of labels y (B,): per example, `n_draws` draws of (t, ε) from
  fold_in(key_b, draw), each used for both the conditional and the null-class error."""
  low, high = int(round(t_range[0] * schedule.num_timesteps)), int(round(t_range[1] * schedule.num_timesteps))

  def draw(d):
    k = jax.vmap(lambda key: jax.random.fold_in(key, d))(keys)
    t = jax.vmap(lambda key: jax.random.randint(jax.random.fold_in(key, 0), (), low, high))(k)
    eps = jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, 1), z.shape[1:], jnp.float32))(k)
    z_t = schedule_lib.q_sample(schedule, z, t, eps)
    b = z.shape[0]
    out = model.apply(variables, jnp.concatenate([z_t, z_t]), jnp.concatenate([t, t]),
                      jnp.concatenate([y, jnp.full_like(y, null_label)]))
    pred = split_model_output(out, z.shape[-1])[0].astype(jnp.float32)
    err = jnp.sum((pred - jnp.concatenate([eps, eps])) ** 2, axis=(1, 2, 3))
    return err[:b] - err[b:]
  return jnp.mean(jnp.stack([draw(d) for d in range(n_draws)]), axis=0)


class DpsMethod(base.Method):
  name = NAME
  description = "DPS: diffusion-scored real crops, clustered for diversity"

  def default_settings(self, config):
    c = ml_collections.ConfigDict()
    c.ipc = int(config.recover.ipc)
    c.mipc = 300              # real images per class offered as candidates
    c.num_crop = 5            # random crops per candidate image
    c.scale = (0.08, 1.0)     # RandomResizedCrop scale and ratio (RDED's)
    c.ratio = (1.0, 1.0)
    c.n_draws = 5             # paired (t, ε) draws of the representativeness score
    c.t_range = (0.1, 0.7)    # t ~ U(low, high) x 1000
    c.select = "min"          # per image keep the crop with the lowest R ('min', class-typical) or highest ('max')
    c.feature_block = 8       # features: tokens after this many DiT blocks
    c.feature_t = 160         # timestep of the features (the paper's "1.60")
    c.clusters = 32           # k-means clusters per class
    c.top_clusters = 10       # images filled round-robin from this many best clusters
    c.factor = -1             # stitching factor; -1 = 2 for IPC <= 10, else 1
    c.per_device_batch = 16   # crops per device of one scoring batch
    c.seed = -1
    return c

  def validate(self, settings, config, field):
    generate.needs_diffusion_model(config, field, NAME)
    rded.check_patch_settings(settings, field, factor_auto="2 for IPC <= 10, else 1")
    for name in ("n_draws", "clusters", "top_clusters", "feature_block", "per_device_batch"):
      if not isinstance(settings[name], int) or settings[name] < 1:
        raise errors.ConfigError(f"{field}.{name}={settings[name]!r}: expected an integer >= 1")
    if settings.select not in ("min", "max"):
      raise errors.ConfigError(f"{field}.select={settings.select!r}: expected 'min' (lowest R, class-typical) or 'max'")
    t_range = tuple(settings.t_range)
    if len(t_range) != 2 or not 0 <= t_range[0] < t_range[1] <= 1:
      raise errors.ConfigError(f"{field}.t_range={t_range!r}: expected (low, high) with 0 <= low < high <= 1")
    if not isinstance(settings.feature_t, int) or not 0 <= settings.feature_t < 1000:
      raise errors.ConfigError(f"{field}.feature_t={settings.feature_t!r}: expected a timestep in 0..999")

  def resolved(self, ctx) -> dict:
    s = ctx.settings
    factor = int(s.factor) if s.factor != -1 else (2 if s.ipc <= STITCH_MAX_IPC else 1)
    return {"ipc": int(s.ipc), "mipc": int(s.mipc), "num_crop": int(s.num_crop), "scale": [float(v) for v in s.scale],
            "ratio": [float(v) for v in s.ratio], "n_draws": int(s.n_draws), "t_range": [float(v) for v in s.t_range],
            "select": s.select, "feature_block": int(s.feature_block), "feature_t": int(s.feature_t),
            "clusters": int(s.clusters), "top_clusters": int(s.top_clusters), "factor": factor,
            "seed": ctx.config.seed if s.seed == -1 else int(s.seed)}

  def fingerprint(self, ctx):
    return {NAME: self.resolved(ctx), "prior": prior_lib.variables_fingerprint(ctx.workdir),
            "data": ctx.dataset.fingerprint(), **precision.resolve(ctx.config, "recover").fingerprint()}

  def plan(self, ctx):
    r, dataset, field = self.resolved(ctx), ctx.dataset, ctx.request.field
    rded.check_candidates(r, dataset, field)
    prior = prior_lib.load(ctx.workdir, dataset)
    generate.check_feature_block(r["feature_block"], prior, field)
    return r, prior

  def run(self, ctx, planned):
    r, prior = planned
    dataset, mesh, size = ctx.dataset, ctx.mesh, ctx.dataset.image_size
    factor, ipc = r["factor"], r["ipc"]
    cells, per_device = factor * factor, int(ctx.settings.per_device_batch)
    model, schedule = prior.model, prior.schedule

    def score(v, batch):
      z = prior.encode(v["vae"], batch["x"])
      return {"r": representativeness(model, v["dit"], z, batch["y"], prior.null_label, batch["key"], schedule,
                                      r["n_draws"], r["t_range"])}

    def feature(v, batch):
      z = prior.encode(v["vae"], batch["x"])
      noise = jax.vmap(lambda k: jax.random.normal(k, z.shape[1:], jnp.float32))(batch["key"])
      t = jnp.full((z.shape[0],), r["feature_t"], jnp.int32)
      return {"phi": guidance.features(model, v["dit"], schedule_lib.q_sample(schedule, z, t, noise), t, batch["y"],
                                       r["feature_block"])}

    policy = precision.resolve(ctx.config, "recover")
    with policy.scope():
      score_program, feature_program = units.compile_rows(score, mesh), units.compile_rows(feature, mesh)
    placed = mesh_lib.replicate({"dit": prior.variables, "vae": prior.vae_variables}, mesh)
    print(f"[{ctx.tag}] DPS: {r['mipc']} images x {r['num_crop']} crops per class, {r['n_draws']} draws, "
          f"{r['clusters']} clusters (top {r['top_clusters']}), factor {factor}, {ipc} images per class", flush=True)

    def make(klass):
      chosen, boxes, patches = rded.class_candidates(dataset, r, NAME, klass, size)
      crop_ids = np.array([(klass, t, j) for t in chosen for j in range(r["num_crop"])])
      y = prior.model_labels(np.full(len(patches), klass))
      keys = units.unit_keys(r["seed"], "dps/draws", crop_ids)
      with policy.scope():
        scores = units.map_rows(score, placed, {"x": patches, "y": y, "key": keys}, mesh, per_device=per_device,
                                jitted=score_program)["r"].reshape(len(chosen), r["num_crop"])
      best = scores.argmin(1) if r["select"] == "min" else scores.argmax(1)
      rows = np.arange(len(chosen))
      kept = patches.reshape(len(chosen), r["num_crop"], size, size, 3)[rows, best]
      kept_r = scores[rows, best]
      fkeys = units.unit_keys(r["seed"], "dps/feature_noise", np.stack([np.full(len(chosen), klass), chosen], 1))
      with policy.scope():
        kept_y = prior.model_labels(np.full(len(kept), klass))
        phi = units.map_rows(feature, placed, {"x": kept, "y": kept_y, "key": fkeys}, mesh, per_device=per_device,
                             jitted=feature_program)["phi"]
      picked = cluster_lib.select(phi, kept_r, ipc * cells, clusters=r["clusters"], top_clusters=r["top_clusters"],
                                  rng=units.unit_rng(r["seed"], "dps/kmeans", klass),
                                  lowest_first=r["select"] == "min")
      order = picked["index"]
      cell = size // factor
      ranked = kept[order] if factor == 1 else np.stack([crops_lib.resize(p, cell) for p in kept[order]])
      stitched, which = crops_lib.stitch(ranked, ipc, factor, size)
      return {"images": stitched, "train_index": chosen[order][which], "box": boxes[rows, best][order][which],
              "score": kept_r[order][which], "cluster": picked["cluster"][which],
              "cluster_rank": picked["cluster_rank"][which], "member_rank": picked["member_rank"][which]}
    return rded.run_per_class(ctx, r, NAME, make, lambda results: self._write(ctx, r, results))

  def _write(self, ctx, r, results):
    rded.write_patch_set(ctx, r, results, NAME, {"select": r["select"]},
                         ("score", "cluster", "cluster_rank", "member_rank"))
