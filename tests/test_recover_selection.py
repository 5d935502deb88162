"""Teacher selection distributions, the iteration schedule and the wave scheduler."""

import collections
import math

import pytest

from prism_jax.recover import schedule, selection

POOL = ("mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5", "alexnet")


def spec(**kw):
  base = dict(logit_teacher="resnet18", bn_primary="resnet18", bn_pool=POOL)
  base.update(kw)
  s = selection.SelectionSpec(**base)
  s.validate()
  return s


def test_bernoulli_matches_the_official_slot_process():
  s = spec(distribution="bernoulli", k_max=4, p=0.5)
  draws = [selection.pre_selection(s, seed=0, ipc_index=i, chunk=0, granularity="ipc")[1]
           for i in range(4000)]
  assert all(d[0] == "resnet18" and len(set(d)) == len(d) for d in draws)
  extras = collections.Counter(len(d) - 1 for d in draws)
  # Number of filled slots ~ Binomial(3, 0.5): 1/8, 3/8, 3/8, 1/8.
  for k, p in zip(range(4), (1 / 8, 3 / 8, 3 / 8, 1 / 8)):
    assert abs(extras[k] / len(draws) - p) < 0.03, (k, extras)
  members = collections.Counter(m for d in draws for m in d[1:])
  expected = 1.5 * len(draws) / 4  # E[#extras] = 1.5, spread uniformly over 4 pool members
  for m in POOL:
    assert abs(members[m] - expected) / expected < 0.06, members


def test_uniform_subsets_is_uniform_over_valid_subsets():
  s = spec(distribution="uniform_subsets", k_max=3, include_primary=True)
  subsets = selection.valid_subsets(s)
  assert len(subsets) == 1 + 4 + 6  # primary + 0..2 extras out of 4
  counts = collections.Counter(selection.pre_selection(s, 1, i, 0, "ipc")[1] for i in range(5500))
  assert set(counts) == set(subsets)
  for c in counts.values():
    assert abs(c - 500) < 100
  s2 = spec(distribution="uniform_subsets", k_max=2, include_primary=False)
  subsets2 = selection.valid_subsets(s2)
  assert len(subsets2) == 5 + math.comb(5, 2)
  assert ("mobilenet_v2",) in subsets2  # the primary may be left out


def test_fixed_and_single():
  s = spec(distribution="fixed", fixed_teachers=("resnet18", "mobilenet_v2"))
  assert selection.pre_selection(s, 0, 3, 1, "ipc")[1] == ("resnet18", "mobilenet_v2")
  s = spec(distribution="single")
  assert selection.pre_selection(s, 0, 3, 1, "ipc") == ("resnet18", ("resnet18",))


def test_draws_are_reproducible_and_follow_granularity():
  s = spec()
  a = [selection.pre_selection(s, 7, i, c, "ipc") for i in range(20) for c in range(3)]
  b = [selection.pre_selection(s, 7, i, c, "ipc") for i in range(20) for c in range(3)]
  assert a == b
  # granularity=ipc: every chunk of an IPC index shares the draw.
  for i in range(20):
    assert len({selection.pre_selection(s, 7, i, c, "ipc") for c in range(3)}) == 1
  per_batch = {selection.pre_selection(s, 7, 0, c, "batch")[1] for c in range(40)}
  assert len(per_batch) > 1
  other_seed = [selection.pre_selection(s, 8, i, 0, "ipc") for i in range(20)]
  assert other_seed != a[::3]


def test_intra_redraws_logit_and_bn_teachers_each_iteration():
  s = spec(logit_pool=("mobilenet_v2",))
  draws = [selection.intra_selection(s, 0, 0, 0, t, "ipc") for t in range(200)]
  assert {d[0] for d in draws} == {"resnet18", "mobilenet_v2"}
  assert len({d[1] for d in draws}) > 3


def test_bad_selection_configs_are_named():
  with pytest.raises(ValueError, match="recover.k_max=6 needs 5 extra BN teachers"):
    spec(k_max=6)
  with pytest.raises(ValueError, match="recover.k_max=6 is larger than the 5 BN teachers"):
    spec(distribution="uniform_subsets", k_max=6)
  with pytest.raises(ValueError, match="recover.distribution='gaussian'"):
    spec(distribution="gaussian")
  with pytest.raises(ValueError, match="fixed_teachers"):
    spec(distribution="fixed")


def test_k_counts_bn_less_teachers_unless_asked():
  has_bn = {"resnet18": True, "alexnet": False, "mobilenet_v2": True}
  assert selection.bn_average_count(("resnet18", "alexnet"), has_bn, count_bn_only=False) == 2
  assert selection.bn_average_count(("resnet18", "alexnet"), has_bn, count_bn_only=True) == 1


def test_iteration_schedule_is_the_official_one():
  ts = [schedule.iterations_for(i, 4000, 500, 8) for i in range(10)]
  assert ts == [4000, 3500, 3000, 2500, 2000, 1500, 1000, 500, 4000, 3500]
  assert [schedule.iterations_for(i, 1000, 0, 8) for i in range(3)] == [1000] * 3
  with pytest.raises(ValueError, match="expected at least 1 iteration"):
    schedule.iterations_for(7, 3000, 500, 8)


def test_scheduler_packs_units_by_cost_and_counts_useful_work():
  s = spec()
  select = lambda i, c: selection.pre_selection(s, 0, i, c, "ipc")
  units = schedule.make_units(num_classes=10, ipc=16, classes_per_batch=4, select=select,
                              iterations=lambda i: schedule.iterations_for(i, 80, 10, 8))
  assert len(units) == 16 * 3 and {len(u.classes) for u in units} == {4, 2}
  waves = schedule.plan_waves(units, width=4)
  seen = [u for w in waves for u in w.units]
  assert sorted((u.ipc_index, u.chunk) for u in seen) == sorted((u.ipc_index, u.chunk) for u in units)
  costs = [schedule.default_cost(u) for u in seen]
  for w in waves:
    assert len({len(u.classes) for u in w.units}) == 1  # static shapes within a wave
    assert w.iterations == max(u.iterations for u in w.units)
  # Longest first within each chunk size: costs never increase inside a size group.
  for size in (4, 2):
    group = [schedule.default_cost(u) for u in seen if len(u.classes) == size]
    assert group == sorted(group, reverse=True)
  work = schedule.useful_work(waves, num_devices=4)
  assert work["needed"] == work["executed"] == sum(costs) and work["useful_fraction"] == 1.0
  assert 0.5 < work["device_occupancy"] <= 1.0


def test_useful_work_and_occupancy_by_hand():
  u = lambda i, t, teachers: schedule.Unit(i, 0, (0, 1), teachers[0], teachers, t)
  units = [u(0, 100, ("a",)), u(1, 50, ("a",)), u(2, 100, ("a", "b"))]
  waves = schedule.plan_waves(units, width=2)
  assert [[x.ipc_index for x in w.units] for w in waves] == [[2, 0], [1]]
  # Wave 1 rows cost 200 and 100 -> lasts 200 on 2 devices; wave 2: 50 + padding -> lasts 50.
  work = schedule.useful_work(waves, num_devices=2)
  assert work["needed"] == 350 and work["useful_fraction"] == 1.0
  assert work["device_occupancy"] == pytest.approx(350 / (2 * 200 + 2 * 50))
  # Without per-teacher skipping every unit runs both teachers: 2 x (100 + 50 + 100) executed.
  naive = schedule.useful_work(waves, num_devices=2,
                               group_cost=lambda members, rows: 2.0 * rows * max(x.iterations for x in members))
  assert naive["executed"] == 500 and naive["useful_fraction"] == pytest.approx(350 / 500)
  # Two units on one device are vmapped: each teacher runs for both rows until its last user is
  # done. Wave 1 = [unit 2 (a, b, 100), unit 0 (a, 100)]: 2 rows x (100 for a + 100 for b) = 400;
  # wave 2 = [unit 1 (a, 50), padding]: 2 x 50 = 100.
  one = schedule.useful_work(waves, num_devices=1)
  assert one["executed"] == 500 and one["useful_fraction"] == pytest.approx(350 / 500)
  assert one["device_occupancy"] == pytest.approx(350 / 500)


def test_scheduler_puts_units_with_the_same_teachers_on_one_device():
  u = lambda i, t, teachers: schedule.Unit(i, 0, (0, 1), teachers[0], teachers, t)
  units = [u(0, 100, ("a", "b")), u(1, 100, ("a", "c")), u(2, 100, ("a", "b")), u(3, 100, ("a", "c"))]
  waves = schedule.plan_waves(units, width=4, rows_per_device=2)  # 2 devices x 2 rows
  assert [x.ipc_index for x in waves[0].units] == [0, 2, 1, 3]
  work = schedule.useful_work(waves, num_devices=2)
  assert work["useful_fraction"] == 1.0 and work["executed"] == 2 * 2 * 200


def test_method_presets_express_the_paper_rows():
  from configs import common
  from prism_jax.recover import plan as recover_plan
  get = lambda m: common.set_recover_method(common.base_config(), m).recover
  prism = get("prism")
  assert (prism.distribution, prism.strategy, prism.granularity, prism.init) == ("bernoulli", "pre", "ipc", "real")
  assert (prism.learning_rate, prism.iterations, prism.iteration_step, prism.iteration_period) == (0.05, 4000, 500, 8)
  assert tuple(prism.bn_pool) == POOL and prism.k_max == 4 and prism.p == 0.5
  sre2l = get("sre2l")
  assert (sre2l.distribution, sre2l.init, sre2l.learning_rate, sre2l.iteration_step) == ("single", "noise", 0.25, 0)
  for k in (2, 3, 4):
    spec_k = recover_plan.selection_spec(get(f"multi_k{k}"))
    assert selection.pre_selection(spec_k, 0, 5, 0, "ipc")[1] == ("resnet18",) + POOL[:k - 1]
  intra = get("prism_intra")
  assert intra.strategy == "intra" and recover_plan.selection_spec(intra).all_logit_teachers()[0] == "resnet18"
  decoupled = recover_plan.selection_spec(get("decoupled_pre"))
  draws = {selection.pre_selection(decoupled, 0, i, 0, "ipc")[1] for i in range(60)}
  assert draws == {("mobilenet_v2",), ("efficientnet_b0",), ("shufflenet_v2_x0_5",)}
  assert get("prism_uniform").distribution == "uniform_subsets"
  with pytest.raises(ValueError, match="recover method 'dream'"):
    get("dream")
