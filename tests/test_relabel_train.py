"""Relabel (stored and online soft labels) and student training on tiny data and teachers."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recover_utils as ru
from configs import common
from prism_jax.data import image_sets, sources
from prism_jax.io import artifacts, layout
from prism_jax.parallel import mesh as mesh_lib
from prism_jax.relabel import labeler, reader, store, views
from prism_jax.relabel import plan as relabel_plan
from prism_jax.stages import relabel, train
from prism_jax.train import losses


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  return ru.write_relabel_assets(str(tmp_path_factory.mktemp("relabel_assets")))


def make_config(assets, **train_overrides):
  c = common.base_config()
  c.data = common.data_config(source="arrays", name="tiny", path=assets["data"])
  c.recover.ipc = 4                       # random_real: 4 images per class -> 16 images
  c.image_sets = ("random_real",)
  common.set_protocol(c, "prism")
  rl = c.relabel
  c.teachers_dir = assets["teachers"]
  rl.teachers, rl.aggregation = ("tiny_a", "tiny_b"), "norm_rescaled_mean"
  tr = c.train
  tr.student, tr.width = "tiny_a", 1.0
  tr.epochs, tr.batch_size, tr.accumulation = 3, 8, 2
  tr.eval_every_epochs, tr.log_every_steps, tr.checkpoint_every_steps = 1.0, 2, 2
  c.progress_interval_s = 0.0
  for k, v in train_overrides.items():
    tr[k] = v
  return c


@pytest.fixture(scope="module")
def relabeled(assets, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("relabel_run"))
  config = make_config(assets)
  ru.distill(config, workdir)
  index = relabel.run(config, workdir, mesh_lib.make_mesh(8))["random_real"]
  return workdir, config, index


def _image_set(config, workdir):
  dataset = sources.open_dataset(config.data)
  return dataset, image_sets.load("random_real", workdir=workdir, dataset=dataset)


def test_views_replay_crop_flip_and_cutmix_by_hand():
  spec = views.ViewSpec(image_size=4, rrc_scale=(0.25, 1.0))
  images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
  params = views.ViewParams(
      crop=jnp.asarray([[0, 0, 4, 4], [0, 0, 4, 4]], jnp.int32), flip=jnp.asarray([False, True]),
      patch_perm=jnp.zeros((2, 1), jnp.int32), cutmix_box=jnp.asarray([0, 2, 0, 2], jnp.int32),
      cutmix_perm=jnp.asarray([1, 0], jnp.int32), cutmix_lam=jnp.float32(0.75))
  out = np.asarray(views.make_views(images, params, spec))
  x = images.astype(np.float32) / 255
  expected = np.stack([x[0], x[1][:, ::-1]])           # full-image crop = identity; image 1 flipped
  mixed = expected.copy()
  mixed[0, :2, :2], mixed[1, :2, :2] = expected[1, :2, :2], expected[0, :2, :2]  # box from the partner
  np.testing.assert_allclose(out, mixed, atol=1e-6)


def test_plan_is_a_function_of_seed_epoch_batch_only():
  spec = views.ViewSpec(image_size=16)
  a = views.sample_view_params(views.batch_key(0, 2, 1), 8, spec)
  b = views.sample_view_params(views.batch_key(0, 2, 1), 8, spec)
  c = views.sample_view_params(views.batch_key(0, 2, 0), 8, spec)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not np.array_equal(a.crop, c.crop)
  crops = np.asarray(a.crop)
  areas = crops[:, 2] * crops[:, 3] / 256.0
  assert crops.min() >= 0 and (crops[:, 0] + crops[:, 2] <= 16).all() and areas.min() >= 0.25 - 0.1
  order = views.sample_order(16, 0, 2)
  assert sorted(order.tolist()) == list(range(16))
  np.testing.assert_array_equal(views.batch_indices(16, 8, 0, 2, 1), order[8:16])


def test_relabel_writes_checksummed_epoch_shards(relabeled):
  workdir, config, index = relabeled
  directory = layout.relabel_dir(workdir, "random_real")
  assert index["complete"] and sorted(index["shards"]) == [store.shard_name(e) for e in range(3)]
  shard = store.read_shard(directory, 1, index)
  assert shard["logits"].dtype == np.float16 and shard["logits"].shape == (2, 8, 4)
  assert shard["indices"].shape == (2, 8) and shard["crop"].shape == (2, 8, 4)
  # Each epoch uses every image exactly once (16 images, 2 batches of 8).
  assert sorted(shard["indices"].reshape(-1).tolist()) == list(range(16))
  assert shard["cutmix_box"].shape == (2, 4) and shard["cutmix_lam"].shape == (2,)


def test_student_sees_exactly_the_pixels_the_teachers_labeled(relabeled):
  workdir, config, index = relabeled
  dataset, image_set = _image_set(config, workdir)
  spec = relabel_plan.view_spec(config, dataset)
  directory = layout.relabel_dir(workdir, "random_real")
  epoch, b = 2, 1
  # What the relabel stage fed the teachers (its own plan draw) ...
  indices, params = relabel_plan.draw_batch(image_set.num_images, 8, spec, config.seed, epoch, b)
  teacher_input = views.normalized_views(image_set.images[indices], params, spec, dataset.mean, dataset.std)
  # ... and what the train stage builds from the stored shard.
  images, stored_params, hard, logits = reader.stored_batch(store.read_shard(directory, epoch, index), b,
                                                           image_set.images, image_set.labels)
  student_input = views.normalized_views(images, stored_params, spec, dataset.mean, dataset.std)
  np.testing.assert_array_equal(np.asarray(student_input), np.asarray(teacher_input))
  np.testing.assert_array_equal(hard, image_set.labels[indices])
  models_, variables, _ = ru.teacher_set(("tiny_a", "tiny_b"), config.teachers_dir, dataset)
  recomputed = labeler.ensemble_logits(models_, variables, student_input, "norm_rescaled_mean")
  np.testing.assert_allclose(logits.astype(np.float32), np.asarray(recomputed), rtol=2e-3, atol=2e-3)
  assert np.abs(logits).max() > 0


def test_online_mode_computes_the_stored_labels(relabeled, assets):
  workdir, config, index = relabeled
  dataset, image_set = _image_set(config, workdir)
  spec = relabel_plan.view_spec(config, dataset)
  directory = layout.relabel_dir(workdir, "random_real")
  shard = store.read_shard(directory, 0, index)
  models_, variables, _ = ru.teacher_set(("tiny_a", "tiny_b"), config.teachers_dir, dataset)
  for b in range(2):
    indices, params = relabel_plan.draw_batch(image_set.num_images, 8, spec, config.seed, 0, b)
    x = views.normalized_views(image_set.images[indices], params, spec, dataset.mean, dataset.std)
    online = np.asarray(labeler.ensemble_logits(models_, variables, x, "norm_rescaled_mean"))
    np.testing.assert_allclose(online, shard["logits"][b].astype(np.float32), rtol=2e-3, atol=2e-3)


def test_relabel_resume_redoes_only_the_unfinished_epoch(relabeled, assets):
  workdir, config, index = relabeled
  directory = layout.relabel_dir(workdir, "random_real")
  before = dict(index["shards"])
  kept = os.path.getmtime(os.path.join(directory, store.shard_name(0)))
  # A run killed after writing epoch 2's shard but before recording it, epoch 1 never written.
  partial = dict(index, complete=False,
                 shards={k: v for k, v in before.items() if k == store.shard_name(0)})
  store.write_index(directory, partial)
  os.remove(os.path.join(directory, store.shard_name(1)))
  again = relabel.run(config, workdir, mesh_lib.make_mesh(2))["random_real"]
  assert again["complete"] and again["shards"] == before   # identical bytes with a different device count
  assert os.path.getmtime(os.path.join(directory, store.shard_name(0))) == kept


def test_a_truncated_shard_is_relabeled_not_a_dead_end(relabeled, capsys):
  import copy
  workdir, config, index = relabeled
  config = copy.deepcopy(config)
  config.train.seeds = (7,)  # a student of its own
  directory = layout.relabel_dir(workdir, "random_real")
  shard = os.path.join(directory, store.shard_name(2))
  want = open(shard, "rb").read()
  with open(shard, "r+b") as f:
    f.truncate(len(want) // 3)
  # Train names the shard and says what to run; that command redoes exactly that shard.
  with pytest.raises(artifacts.ArtifactError, match=r"epoch_00002.npz: .*rerun the relabel stage"):
    train.run(config, workdir, mesh_lib.make_mesh(1))
  capsys.readouterr()
  again = relabel.run(config, workdir, mesh_lib.make_mesh(1))["random_real"]
  assert "epoch_00002.npz missing or corrupt" in capsys.readouterr().out
  assert again["complete"] and again["shards"] == index["shards"] and open(shard, "rb").read() == want


def test_train_stage_stored_labels_two_seeds(relabeled):
  workdir, config, _ = relabeled
  config.train.seeds = (0, 1)
  results = train.run(config, workdir, mesh_lib.make_mesh(8))["random_real"]
  per_seed = [artifacts.read_json(os.path.join(layout.student_dir(workdir, "random_real", s), layout.STUDENT_FILE))
              for s in (0, 1)]
  best = [r["best_top1"] for r in per_seed]
  assert results["best_top1"]["values"] == best
  assert results["best_top1"]["mean"] == pytest.approx(np.mean(best))
  assert results["best_top1"]["std"] == pytest.approx(np.std(best, ddof=1))
  for r in per_seed:
    assert len(r["history"]) == 3 and [h["epoch"] for h in r["history"]] == [1.0, 2.0, 3.0]
    assert r["best_top1"] >= r["last_top1"] == r["history"][-1]["top1"]
    assert r["protocol"] == "prism"
  assert per_seed[0]["history"] != per_seed[1]["history"]  # different student initializations
  # Rerunning a finished stage is a no-op that returns the same numbers.
  assert train.run(config, workdir, mesh_lib.make_mesh(8))["random_real"]["best_top1"] == results["best_top1"]


def test_student_step_loss_is_the_protocol_loss_on_the_stored_views(relabeled):
  workdir, config, index = relabeled
  dataset, image_set = _image_set(config, workdir)
  spec = relabel_plan.view_spec(config, dataset)
  directory = layout.relabel_dir(workdir, "random_real")
  images, params, hard, logits = reader.stored_batch(store.read_shard(directory, 0, index), 0,
                                                    image_set.images, image_set.labels)
  from prism_jax import models
  from prism_jax.train import optim, student
  model = models.create_model("tiny_a", num_classes=4, stem="small")
  variables = model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 3)), train=False)
  state = student.StudentState.create(apply_fn=model.apply, params=variables["params"],
                                      tx=optim.make_optimizer("adamw", 1e-3, weight_decay=0.01),
                                      batch_stats=variables["batch_stats"])
  _, metrics = student.student_train_step(state, images, params, hard, logits, None, jax.random.key(1),
                                          spec=spec, mean=dataset.mean, std=dataset.std, loss="mse_gt",
                                          gamma=0.1, temperature=20.0, accumulation=1)
  x = views.normalized_views(images, params, spec, dataset.mean, dataset.std)
  student_logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
  expected = losses.mse_gt(student_logits, logits.astype(np.float32), hard, 0.1)
  assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)
  assert 0.0 <= float(metrics["teacher_agreement"]) <= 1.0
  # Hard labels only (no teacher logits at all): the loss is the CE of the same views.
  _, metrics = student.student_train_step(state, images, params, hard, None, None, jax.random.key(1),
                                          spec=spec, mean=dataset.mean, std=dataset.std, loss="ce",
                                          gamma=0.1, temperature=20.0, accumulation=1)
  assert float(metrics["loss"]) == pytest.approx(float(losses.hard_ce(student_logits, hard)), rel=1e-5)
  assert float(metrics["loss"]) != pytest.approx(float(expected), rel=1e-3)
  assert "teacher_agreement" not in metrics


def test_train_online_mode_runs_and_records_it(assets, tmp_path):
  config = make_config(assets, epochs=2, accumulation=1)
  config.relabel.mode = "online"
  workdir = str(tmp_path)
  ru.distill(config, workdir)
  assert relabel.run(config, workdir, mesh_lib.make_mesh(4))["random_real"] == {"mode": "online"}
  results = train.run(config, workdir, mesh_lib.make_mesh(4))["random_real"]
  meta = artifacts.read_json(os.path.join(layout.student_dir(workdir, "random_real", 0), layout.STUDENT_FILE))
  assert meta["fingerprint"]["relabel_mode"] == "online" and len(meta["history"]) == 2
  assert 0.0 <= results["best_top1"]["mean"] <= 1.0


def test_hard_label_protocol_trains_without_teachers_or_soft_labels(assets, tmp_path):
  config = make_config(assets)
  common.set_protocol(config, "hard_label")
  config.train.epochs, config.train.batch_size = 2, 8
  config.teachers_dir = str(tmp_path / "no_teachers_here")  # nothing may read it
  workdir = str(tmp_path / "work")
  ru.distill(config, workdir)
  assert relabel.run(config, workdir, mesh_lib.make_mesh(4))["random_real"] == {"mode": "hard_labels"}
  assert not os.path.exists(layout.relabel_dir(workdir, "random_real"))
  results = train.run(config, workdir, mesh_lib.make_mesh(4))["random_real"]
  meta = artifacts.read_json(os.path.join(layout.student_dir(workdir, "random_real", 0), layout.STUDENT_FILE))
  fp = meta["fingerprint"]
  assert fp["relabel_mode"] == "none" and "teachers" not in fp and fp["train"]["loss"] == "ce"
  assert fp["views"] == {"rrc_scale": [0.08, 1.0], "flip": True, "cutmix": False, "patch_shuffle_grid": 0}
  assert meta["protocol"] == "hard_label" and [h["epoch"] for h in meta["history"]] == [1.0, 2.0]
  assert results["best_top1"]["values"] == [meta["best_top1"]]
  # Switching the same work directory to soft labels is a different student, not "already trained".
  soft = make_config(assets, epochs=2, batch_size=8)
  soft.relabel.mode = "online"
  with pytest.raises(artifacts.ArtifactError, match="student 'random_real' seed 0"):
    train.run(soft, workdir, mesh_lib.make_mesh(4))


@pytest.mark.parametrize("field,value,message", [
    ("batch_size", 4, "different batch_size"),
    ("epochs", 2, "different epochs"),
])
def test_train_refuses_labels_made_for_other_settings(relabeled, field, value, message):
  workdir, config, _ = relabeled
  other = make_config({"data": config.data.path, "teachers": config.teachers_dir}, **{field: value})
  with pytest.raises(artifacts.ArtifactError, match=message):
    train.run(other, workdir, mesh_lib.make_mesh(1))


def test_train_refuses_labels_of_another_image_set(relabeled, tmp_path):
  import shutil
  workdir, config, _ = relabeled
  other = make_config({"data": config.data.path, "teachers": config.teachers_dir})
  other.seed = 5  # a different random_real draw, next to the first draw's soft labels
  other_workdir = str(tmp_path / "other")
  ru.distill(other, other_workdir)
  shutil.copytree(layout.relabel_dir(workdir, "random_real"), layout.relabel_dir(other_workdir, "random_real"))
  with pytest.raises(artifacts.ArtifactError, match="different image set"):
    train.run(other, other_workdir, mesh_lib.make_mesh(1))
  # The same set with another seed: the soft labels' plan (batches, views) is another one.
  with pytest.raises(artifacts.ArtifactError, match="different seed"):
    train.run(other, workdir, mesh_lib.make_mesh(1))


def test_missing_and_corrupt_shards_are_named(relabeled, tmp_path):
  workdir, config, index = relabeled
  directory = layout.relabel_dir(workdir, "random_real")
  with pytest.raises(artifacts.ArtifactError, match="missing soft-label shard for epoch 7"):
    store.read_shard(directory, 7, index)
  copy = str(tmp_path / "relabel")
  os.makedirs(copy)
  with open(os.path.join(directory, store.shard_name(0)), "rb") as f:
    data = bytearray(f.read())
  data[len(data) // 2] ^= 0xFF
  with open(os.path.join(copy, store.shard_name(0)), "wb") as f:
    f.write(bytes(data))
  with pytest.raises(artifacts.ArtifactError, match="corrupt"):
    store.read_shard(copy, 0, index)


def test_bad_relabel_and_train_config_values(assets, tmp_path):
  cases = [("relabel", "aggregation", "median", "relabel.aggregation"),
           ("relabel", "mode", "lazy", "relabel.mode"),
           ("train", "loss", "hinge", "train.loss"),
           ("train", "accumulation", 3, "train.accumulation")]
  for section, field, value, message in cases:
    config = make_config(assets)
    config[section][field] = value
    with pytest.raises(ValueError, match=message):
      train.run(config, str(tmp_path), mesh_lib.make_mesh(1))
  config = make_config(assets)
  ru.distill(config, str(tmp_path))
  config.relabel.teachers = ("tiny_a", "missing_teacher")
  with pytest.raises(artifacts.ArtifactError, match="missing_teacher"):
    relabel.run(config, str(tmp_path), mesh_lib.make_mesh(1))
  config = make_config(assets, batch_size=32)
  with pytest.raises(ValueError, match="train.batch_size=32 is larger than the 16 images"):
    relabel.run(config, str(tmp_path), mesh_lib.make_mesh(1))


def test_protocol_presets():
  c = common.base_config()
  common.set_protocol(c, "rd3")
  assert (c.train.batch_size, c.train.zeta, c.train.epochs, c.relabel.patch_shuffle_grid) == (50, 1.0, 400, 2)
  c.train.student = "mobilenet_v2"
  common.set_protocol(c, "rd3")
  assert (c.train.batch_size, c.train.zeta, c.train.schedule) == (100, 2.0, "smoothed_cosine")
  common.set_protocol(c, "sre2l")
  assert (c.train.loss, c.train.temperature, c.relabel.aggregation, c.relabel.rrc_scale) == ("kl", 20.0, "single", (0.08, 1.0))
  common.set_protocol(c, "prism")
  assert (c.train.schedule, c.train.zeta, c.train.gamma, c.relabel.rrc_scale) == ("prism_cos2", 2.5, 0.1, (0.25, 1.0))
  common.set_protocol(c, "hard_label")
  assert (c.train.loss, c.relabel.teachers, c.relabel.cutmix, c.relabel.rrc_scale) == ("ce", (), False, (0.08, 1.0))
  relabel_plan.check_config(c)  # no teachers needed
  c.train.loss, c.train.protocol = "mse_gt", "custom"
  with pytest.raises(ValueError, match="relabel.teachers is empty"):
    relabel_plan.check_config(c)
  with pytest.raises(ValueError, match="train.protocol"):
    common.set_protocol(c, "fancy")


def test_primary_weighted_aggregation_is_the_official_r50_recipe():
  from prism_jax.relabel import aggregate
  rng = np.random.default_rng(0)
  z = rng.normal(size=(4, 6, 5)).astype(np.float32)
  mixed = 0.5 * z[0] + (0.5 / 3) * (z[1] + z[2] + z[3])
  rows = np.linalg.norm(mixed, axis=1, keepdims=True)
  want = mixed / rows * rows.mean()
  np.testing.assert_allclose(np.asarray(aggregate.aggregate_logits(z, "primary_weighted")), want, rtol=1e-5, atol=1e-6)
  one = np.asarray(aggregate.aggregate_logits(z[:1], "primary_weighted"))  # one teacher: only the row rescale
  norms = np.linalg.norm(z[0], axis=1, keepdims=True)
  np.testing.assert_allclose(one, z[0] / norms * norms.mean(), rtol=1e-5, atol=1e-6)
  c = common.base_config()
  c.train.student = "resnet50"
  common.set_protocol(c, "prism")
  assert c.relabel.teachers[0] == "resnet50" and c.relabel.aggregation == "primary_weighted"
  relabel_plan.check_config(c)  # the protocol's own settings


def test_random_real_is_seeded_class_balanced_and_checked(assets):
  config = make_config(assets)
  dataset = sources.open_dataset(config.data)
  a = image_sets.random_real(dataset, 4, seed=0)
  b = image_sets.random_real(dataset, 4, seed=0)
  c = image_sets.random_real(dataset, 4, seed=1)
  assert a.content_hash() == b.content_hash() != c.content_hash()
  np.testing.assert_array_equal(a.labels, np.repeat(np.arange(4), 4))
  with pytest.raises(ValueError, match="smallest class"):
    image_sets.random_real(dataset, 7, seed=0)


def _tiny_state(name, tx, seed=0):
  from prism_jax import models
  from prism_jax.train import student
  model = models.create_model(name, num_classes=4, stem="small")
  variables = model.init(jax.random.key(seed), jnp.zeros((2, 16, 16, 3)), train=False)
  return student.StudentState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                     batch_stats=variables.get("batch_stats", {}), ema_params=variables["params"])


def _stored_inputs(relabeled, epoch=0, b=0):
  workdir, config, index = relabeled
  dataset, image_set = _image_set(config, workdir)
  directory = layout.relabel_dir(workdir, "random_real")
  batch = reader.stored_batch(store.read_shard(directory, epoch, index), b, image_set.images, image_set.labels)
  return dataset, relabel_plan.view_spec(config, dataset), batch


def test_accumulation_averages_micro_batch_gradients_and_ema_tracks_params(relabeled):
  import optax
  from prism_jax.train import student
  dataset, spec, (images, params, hard, logits) = _stored_inputs(relabeled)
  kw = dict(spec=spec, mean=dataset.mean, std=dataset.std, loss="mse_gt", gamma=0.1, temperature=20.0)
  # A BatchNorm-free student: the mean loss over two equal halves has the full batch's gradient.
  sgd = optax.sgd(0.5)
  one, _ = student.student_train_step(_tiny_state("tiny_nobn", sgd), images, params, hard, logits, None,
                                      jax.random.key(1), accumulation=1, **kw)
  two, _ = student.student_train_step(_tiny_state("tiny_nobn", sgd), images, params, hard, logits, None,
                                      jax.random.key(1), accumulation=2, **kw)
  start = _tiny_state("tiny_nobn", sgd)
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), one.params, start.params)
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-4
  for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(two.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  # EMA after one step: decay * initial + (1 - decay) * updated parameters.
  ema, _ = student.student_train_step(start, images, params, hard, logits, None, jax.random.key(1),
                                      accumulation=1, ema_decay=0.9, **kw)
  for e, p0, p1 in zip(*(jax.tree_util.tree_leaves(t) for t in (ema.ema_params, _tiny_state("tiny_nobn", sgd).params,
                                                               ema.params))):
    np.testing.assert_allclose(np.asarray(e), 0.9 * np.asarray(p0) + 0.1 * np.asarray(p1), rtol=1e-5, atol=1e-7)


def test_killed_student_run_resumes_to_the_same_result(relabeled, tmp_path):
  import shutil
  workdir, config, _ = relabeled
  config.train.seeds = (3,)
  first = train.run(config, workdir, mesh_lib.make_mesh(1))["random_real"]
  out = layout.student_dir(workdir, "random_real", 3)
  # Simulate a crash after step 4 of 6: the final checkpoint and the result file never written.
  os.remove(os.path.join(out, layout.STUDENT_FILE))
  shutil.rmtree(os.path.join(out, "ckpt", "6"))
  again = train.run(config, workdir, mesh_lib.make_mesh(1))["random_real"]
  meta = artifacts.read_json(os.path.join(out, layout.STUDENT_FILE))
  assert meta["timing_last_run"]["steps_run"] == 2       # only steps 5 and 6 were run again
  assert again["best_top1"] == first["best_top1"] and again["last_top1"] == first["last_top1"]


def test_a_corrupt_checkpoint_is_reported_and_the_previous_one_resumed(relabeled, capsys):
  workdir, config, _ = relabeled
  config.train.seeds = (4,)
  first = train.run(config, workdir, mesh_lib.make_mesh(1))["random_real"]
  out = layout.student_dir(workdir, "random_real", 4)
  os.remove(os.path.join(out, layout.STUDENT_FILE))  # as if killed after the last checkpoint
  step_dir = os.path.join(out, "ckpt", "6")
  files = [os.path.join(root, f) for root, _, names in os.walk(step_dir) for f in names]
  largest = max(files, key=os.path.getsize)
  data = bytearray(open(largest, "rb").read())
  data[len(data) // 2] ^= 0x10  # a flipped bit: same size, other weights
  open(largest, "wb").write(bytes(data))
  capsys.readouterr()
  again = train.run(config, workdir, mesh_lib.make_mesh(1))["random_real"]
  printed = capsys.readouterr().out
  assert f"{step_dir}: " in printed and "fails its checksum; not resuming from it (trying the previous one)" in printed
  assert "resuming from step 4/6" in printed
  meta = artifacts.read_json(os.path.join(out, layout.STUDENT_FILE))
  assert meta["timing_last_run"]["steps_run"] == 2  # steps 5 and 6 again, from the intact step 4
  assert again["best_top1"] == first["best_top1"] and again["last_top1"] == first["last_top1"]


def test_sigterm_saves_the_step_and_a_rerun_resumes_to_the_same_result(relabeled, monkeypatch):
  import signal
  from prism_jax.io import preemption
  workdir, config, _ = relabeled
  config.train.seeds, config.train.checkpoint_every_steps = (5,), 100  # no interval save before the end
  calls = []
  real = reader.stored_batch

  def batch_then_sigterm(*args):  # the preemption notice arrives while step 3 (of 6) runs
    calls.append(1)
    if len(calls) == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(*args)

  monkeypatch.setattr(reader, "stored_batch", batch_then_sigterm)
  with pytest.raises(preemption.Preempted, match=r"preempted \(SIGTERM\) after step 3/6: checkpoint saved"):
    train.run(config, workdir, mesh_lib.make_mesh(1))
  out = layout.student_dir(workdir, "random_real", 5)
  assert sorted(n for n in os.listdir(os.path.join(out, "ckpt")) if n.isdigit()) == ["3"]
  assert signal.getsignal(signal.SIGTERM) is not None and not preemption.requested()
  monkeypatch.setattr(reader, "stored_batch", real)
  train.run(config, workdir, mesh_lib.make_mesh(1))
  resumed = artifacts.read_json(os.path.join(out, layout.STUDENT_FILE))
  assert resumed["timing_last_run"]["steps_run"] == 3  # steps 4 to 6 (resume equality: the kill test above)
  assert [h["step"] for h in resumed["history"]] == [2, 4, 6]  # the evaluation before the notice was kept


def test_labels_with_another_class_count_are_refused(relabeled, tmp_path):
  import shutil
  workdir, config, index = relabeled
  src = layout.relabel_dir(workdir, "random_real")
  dst = str(tmp_path / "relabel")
  shutil.copytree(src, dst)
  shard = store.read_shard(dst, 0, index)
  shard["logits"] = np.zeros(shard["logits"].shape[:2] + (7,), np.float16)
  fixed = dict(index, shards=dict(index["shards"], **{store.shard_name(0): store.write_shard(dst, 0, shard)}))
  dataset, image_set = _image_set(config, workdir)
  labels = reader.StoredLabels.__new__(reader.StoredLabels)
  labels.dir, labels.index, labels._epoch, labels._shard, labels.num_classes = dst, fixed, -1, None, 4
  with pytest.raises(artifacts.ArtifactError, match="7 classes in the soft labels, the student has 4"):
    labels.epoch(0)


def test_a_protocol_name_that_does_not_match_the_settings_is_refused(assets, tmp_path):
  config = make_config(assets)
  config.train.protocol = "rd3"   # e.g. --config.train.protocol=rd3 without the rd3 settings
  with pytest.raises(ValueError, match="train.protocol='rd3' but relabel.aggregation"):
    relabel.run(config, str(tmp_path), mesh_lib.make_mesh(1))
  config.train.protocol = "custom"
  relabel_plan.check_config(config)
