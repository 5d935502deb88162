"""Metrics and pictures: cosine-similarity diversity, feature extraction, image grid, UMAP, report."""

from __future__ import annotations

import math
import os

import jax
import numpy as np
import pytest
from PIL import Image

from prism_jax import models
from prism_jax.data import stats
from prism_jax.metrics import diversity, pictures, report

SQRT2 = math.sqrt(2.0)


# ---------------------------------------------------------------------------------------- diversity

def test_cosine_similarity_stats_hand_computed():
  # Class 0: directions 0, 90 and 180 degrees (different lengths: similarity must not see them):
  #   pairs (0, 90) = 0, (0, 180) = -1, (90, 180) = 0 -> intra -1/3.
  # Class 1: two vectors along 45 degrees -> intra 1. Class 2: one image, class 3: none -> NaN.
  features = np.array([[2, 0], [0, 3], [-1, 0],
                       [1, 1], [2, 2],
                       [5, 0]], np.float32)
  labels = np.array([0, 0, 0, 1, 1, 2])
  out = diversity.cosine_similarity_stats(features, labels, num_classes=4)
  intra = out["intra_per_class"]
  assert intra[0] == pytest.approx(-1 / 3) and intra[1] == pytest.approx(1.0)
  assert math.isnan(intra[2]) and math.isnan(intra[3])
  assert out["intra_mean"] == pytest.approx(1 / 3)
  assert out["intra_std"] == pytest.approx(2 / 3)
  # Across classes, unit vectors a=(1,0) b=(0,1) c=(-1,0) | d=e=(1,1)/sqrt2 | f=(1,0):
  #   class 0 vs {d, e, f}: (2/sqrt2 + 1) + 2/sqrt2 + (-2/sqrt2 - 1) = sqrt2 over 9 pairs;
  #   class 1 vs {a, b, c, f}: 2 * (1 + 1 - 1 + 1)/sqrt2 = 2 sqrt2 over 8 pairs;
  #   class 2 vs {a, b, c, d, e}: 1 + 0 - 1 + 2/sqrt2 = sqrt2 over 5 pairs;
  #   all unordered pairs: (0,1) sqrt2 + (0,2) 0 + (1,2) sqrt2 over 6 + 3 + 2 pairs.
  inter = out["inter_per_class"]
  assert inter[0] == pytest.approx(SQRT2 / 9)
  assert inter[1] == pytest.approx(SQRT2 / 4)
  assert inter[2] == pytest.approx(SQRT2 / 5)
  assert math.isnan(inter[3])
  assert out["inter_mean"] == pytest.approx(2 * SQRT2 / 11)
  assert out["count_per_class"] == [3, 2, 1, 0] and out["num_images"] == 6
  assert all(isinstance(v, float) for v in intra + inter)


def test_cosine_similarity_identical_and_orthogonal():
  same = diversity.cosine_similarity_stats(np.array([[3.0, 4.0]] * 4), np.zeros(4, int), num_classes=1)
  assert same["intra_mean"] == pytest.approx(1.0) and math.isnan(same["inter_mean"])
  ortho = diversity.cosine_similarity_stats(np.eye(3), np.array([0, 0, 1]), num_classes=2)
  assert ortho["intra_per_class"][0] == pytest.approx(0.0)
  assert ortho["inter_mean"] == pytest.approx(0.0)


def test_cosine_similarity_matches_brute_force():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(23, 5))
  labels = rng.integers(0, 4, size=23)
  out = diversity.cosine_similarity_stats(features, labels, num_classes=4)
  unit = features / np.linalg.norm(features, axis=1, keepdims=True)
  sim = unit @ unit.T
  for c in range(4):
    idx = np.flatnonzero(labels == c)
    block = sim[np.ix_(idx, idx)]
    expected = (block.sum() - np.trace(block)) / (len(idx) * (len(idx) - 1))
    assert out["intra_per_class"][c] == pytest.approx(expected)
    assert out["inter_per_class"][c] == pytest.approx(sim[np.ix_(idx, np.flatnonzero(labels != c))].mean())
  different = labels[:, None] != labels[None, :]
  assert out["inter_mean"] == pytest.approx(sim[different].mean())


def test_cosine_similarity_rejects_bad_labels():
  with pytest.raises(ValueError, match="labels range"):
    diversity.cosine_similarity_stats(np.ones((2, 3)), np.array([0, 3]), num_classes=3)
  with pytest.raises(ValueError, match="labels has shape"):
    diversity.cosine_similarity_stats(np.ones((2, 3)), np.array([0]), num_classes=3)


def test_extract_features_shape_and_padding_invariance():
  model = models.create_model("resnet18", num_classes=3, stem="small", width=0.125)
  variables = models.random_variables(model, (1, 8, 8, 3), seed=1)
  images = np.random.default_rng(0).integers(0, 256, size=(7, 8, 8, 3), dtype=np.uint8)
  mean, std = stats.PRESETS["cifar"]
  padded = diversity.extract_features(model, variables, images, mean, std, batch_size=3)
  whole = diversity.extract_features(model, variables, images, mean, std, batch_size=100)
  _, direct = jax.jit(lambda v, x: model.apply(v, x, train=False, return_features=True))(
      variables, stats.normalize(images, mean, std))
  assert padded.shape == (7, direct.shape[1]) and padded.dtype == np.float32
  np.testing.assert_allclose(padded, whole, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(whole, np.asarray(direct), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="uint8"):
    diversity.extract_features(model, variables, images.astype(np.float32), mean, std)


# ----------------------------------------------------------------------------------------- pictures

def test_image_grid_layout_and_tiles(tmp_path):
  rng = np.random.default_rng(0)
  first = rng.integers(0, 200, size=(5, 8, 8, 3), dtype=np.uint8)
  second = rng.integers(0, 200, size=(2, 8, 8, 3), dtype=np.uint8)
  sets = {"sre2l": (first, np.array([0, 0, 0, 1, 2])), "prism": (second, np.array([1, 0]))}
  path = str(tmp_path / "out" / "grid.png")
  assert pictures.image_grid(sets, ["cat", "dog", "bird"], path, per_class=2, max_classes=2) == path
  grid = np.asarray(Image.open(path).convert("RGB"))
  tile = 64                                                       # 8 px images, nearest x8
  block = 2 * tile + pictures.TILE_GAP
  width = 2 * pictures.MARGIN + pictures.LABEL_WIDTH + 2 * block + pictures.GROUP_GAP
  height = 2 * pictures.MARGIN + pictures.HEADER_HEIGHT + 2 * tile + pictures.TILE_GAP
  assert grid.shape == (height, width, 3)

  def cell(method_index, row, column):
    left = pictures.MARGIN + pictures.LABEL_WIDTH + method_index * (block + pictures.GROUP_GAP)
    left += column * (tile + pictures.TILE_GAP)
    top = pictures.MARGIN + pictures.HEADER_HEIGHT + row * (tile + pictures.TILE_GAP)
    return grid[top:top + tile, left:left + tile]

  def upscaled(image):
    return np.repeat(np.repeat(image, 8, axis=0), 8, axis=1)

  np.testing.assert_array_equal(cell(0, 0, 1), upscaled(first[1]))    # sre2l, class 0, 2nd image
  np.testing.assert_array_equal(cell(0, 1, 0), upscaled(first[3]))    # sre2l, class 1
  np.testing.assert_array_equal(cell(1, 0, 0), upscaled(second[1]))   # prism, class 0
  assert np.all(cell(1, 0, 1) == 255)                                 # prism has one class-0 image
  assert np.all(cell(0, 1, 1) == 255)                                 # sre2l has one class-1 image
  assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path / "out"))


def test_image_grid_rejects_mixed_sizes(tmp_path):
  sets = {"a": (np.zeros((1, 8, 8, 3), np.uint8), np.zeros(1, int)),
          "b": (np.zeros((1, 16, 16, 3), np.uint8), np.zeros(1, int))}
  with pytest.raises(ValueError, match="different image sizes"):
    pictures.image_grid(sets, ["x"], str(tmp_path / "g.png"))


def test_umap_plot_separates_clusters(tmp_path):
  rng = np.random.default_rng(0)
  sizes = (14, 13, 13)
  labels = np.repeat(np.arange(3), sizes)
  centers = 12.0 * np.eye(3, 10)
  features = (centers[labels] + rng.normal(size=(labels.size, 10))).astype(np.float32)
  path = str(tmp_path / "umap.png")
  embedding = pictures.umap_plot(features, labels, ["a", "b", "c"], path, seed=0, title="test")
  assert embedding.shape == (40, 2) and np.all(np.isfinite(embedding))
  assert Image.open(path).format == "PNG"
  distances = np.linalg.norm(embedding[:, None] - embedding[None], axis=-1)
  np.fill_diagonal(distances, np.inf)
  np.testing.assert_array_equal(labels[np.argmin(distances, axis=1)], labels)
  again = pictures.embed_2d(features, seed=0)
  np.testing.assert_allclose(again, embedding, atol=1e-5)         # fixed random_state: reproducible


def test_umap_plot_too_few_points_uses_pca(tmp_path):
  path = str(tmp_path / "tiny.png")
  embedding = pictures.umap_plot(np.array([[0.0, 0, 1], [0, 2, 0], [3, 0, 0]]), np.array([0, 1, 1]),
                                 ["a", "b"], path)
  assert embedding.shape == (3, 2) and os.path.exists(path)


# ------------------------------------------------------------------------------------------- report

ROWS = [{"method": "prism", "images": 10, "top1": {"mean": 45.678, "std": 1.2345}, "intra": 0.51234,
         "note": None},
        {"method": "sre2l|x", "images": 100, "top1": (40.0, 0.5), "intra": float("nan")}]
COLUMNS = ("method", "images", "top1", "intra", "note")


def test_format_value():
  assert report.format_value(None) == "-"
  assert report.format_value(3) == "3" and report.format_value(np.int64(3)) == "3"
  assert report.format_value(np.float32(0.125)) == "0.12" and report.format_value(2.0) == "2.00"
  assert report.format_value((1.0, 0.25)) == "1.00 ± 0.25"
  assert report.format_value({"mean": 1, "std": 0}) == "1 ± 0"
  assert report.format_value(True) == "True" and report.format_value("x") == "x"


def test_format_table_exact():
  expected = ("method   images          top1  intra  note\n"
              "-------  ------  ------------  -----  ----\n"
              "prism        10  45.68 ± 1.23   0.51  -\n"
              "sre2l|x     100  40.00 ± 0.50      –  -")
  assert report.format_table(ROWS, COLUMNS) == expected


def test_write_report_exact(tmp_path):
  out_dir = tmp_path / "evaluate"
  path = str(out_dir / "report.md")
  pics = [("Grid [all]", str(out_dir / "grid.png")), ("UMAP", str(out_dir / "umap" / "a.png"))]
  text = report.write_report(path, "Results", ROWS, COLUMNS, pics, notes=("top-1 in %", "seeds 0, 1"))
  expected = ("# Results\n"
              "\n"
              "| method | images | top1 | intra | note |\n"
              "| --- | ---: | ---: | ---: | --- |\n"
              "| prism | 10 | 45.68 ± 1.23 | 0.51 | - |\n"
              "| sre2l\\|x | 100 | 40.00 ± 0.50 | – | - |\n"
              "\n"
              "![Grid \\[all\\]](grid.png)\n"
              "\n"
              "![UMAP](umap/a.png)\n"
              "\n"
              "- top-1 in %\n"
              "- seeds 0, 1\n")
  assert text == expected
  with open(path, encoding="utf-8") as f:
    assert f.read() == expected
  with pytest.raises(ValueError, match=r"pictures\[0\]"):
    report.write_report(path, "x", ROWS, COLUMNS, ["grid.png"])


def test_dd_ranking_metrics_follow_their_formulas():
  import math
  from prism_jax.metrics import ranking
  # LRS = (e^a - e^-1) / (e - e^-1) * 100 with a = w IOR - (1 - w) HLR, fractions.
  assert ranking.lrs(0.0, 0.0) == pytest.approx((1 - math.exp(-1)) / (math.e - math.exp(-1)) * 100)
  assert ranking.lrs(0.1, 0.3, 0.5) == pytest.approx((math.exp(-0.1) - math.exp(-1)) / (math.e - math.exp(-1)) * 100)
  assert ranking.lrs(1.0, 0.0, 1.0) == pytest.approx(100.0) and ranking.lrs(0.0, 1.0, 0.0) == pytest.approx(0.0)
  top1 = {"random_real": 40.0, "random_real_s1": 44.0, "prism": 50.0, "dit": None}
  out = ranking.columns(top1, random_sets=("random_real", "random_real_s1"), hard_top1={"prism": 30.0},
                        full_top1=90.0, weight=0.5)
  assert out["prism"]["ior"] == {"mean": pytest.approx(8.0), "std": pytest.approx(2.0)}  # random 42 +- 2
  assert out["prism"]["hlr"] == pytest.approx(60.0)
  assert out["prism"]["lrs"] == pytest.approx(ranking.lrs(0.08, 0.60))
  assert out["random_real"]["ior"]["mean"] == pytest.approx(-2.0) and out["random_real"]["hlr"] is None
  assert out["dit"] == {"ior": None, "hlr": None, "lrs": None}
  with pytest.raises(ValueError, match="weight"):
    ranking.lrs(0.0, 0.0, 1.5)
