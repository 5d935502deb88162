"""Augmentation: values on tiny images checked by hand or against numpy references of torchvision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism_jax.data import augment as aug


def ramp_image(height, width, channels=1):
  """image[r, c, k] = width*r + c + 100*k: bilinear resampling of it is again affine."""
  rows, cols, chans = np.meshgrid(np.arange(height), np.arange(width), np.arange(channels), indexing="ij")
  return (width * rows + cols + 100 * chans).astype(np.float32)


def torch_resized_crop_reference(image, top, left, height, width, out_h, out_w):
  """torchvision F.resized_crop(BILINEAR, antialias=False) = crop, then PyTorch upsample_bilinear2d
  (align_corners=False), written out pixel by pixel from its C++ source index formula."""
  crop = image[top:top + height, left:left + width].astype(np.float64)

  def source(dst, in_size, out_size):
    src = max((dst + 0.5) * in_size / out_size - 0.5, 0.0)
    lower = int(src)
    upper = lower + 1 if lower < in_size - 1 else lower
    return lower, upper, src - lower

  out = np.zeros((out_h, out_w, image.shape[2]))
  for oy in range(out_h):
    y0, y1, wy = source(oy, height, out_h)
    for ox in range(out_w):
      x0, x1, wx = source(ox, width, out_w)
      out[oy, ox] = ((1 - wy) * ((1 - wx) * crop[y0, x0] + wx * crop[y0, x1])
                     + wy * ((1 - wx) * crop[y1, x0] + wx * crop[y1, x1]))
  return out


# ----------------------------------------------------------------------------- RandomResizedCrop


def test_rrc_full_box_same_size_is_identity():
  image = np.random.default_rng(0).normal(size=(6, 5, 3)).astype(np.float32)
  out = aug.apply_rrc(jnp.asarray(image), jnp.array([0, 0, 6, 5]), (6, 5))
  np.testing.assert_array_equal(np.asarray(out), image)


def test_rrc_downsample_by_two_averages_pixel_blocks():
  # 4x4 ramp -> 2x2: source coordinates 0.5 and 2.5, i.e. the mean of each 2x2 block.
  out = aug.apply_rrc(jnp.asarray(ramp_image(4, 4)), jnp.array([0, 0, 4, 4]), (2, 2))
  np.testing.assert_allclose(np.asarray(out)[..., 0], [[2.5, 4.5], [10.5, 12.5]], atol=1e-6)


def test_rrc_upsample_inner_crop_by_hand():
  # Crop [[5, 6], [9, 10]] at (1, 1) of the 4x4 ramp, resized to 4x4. Source coordinates
  # (d + 0.5)/2 - 0.5 = -0.25 -> 0 (clamped), 0.25, 0.75, 1.25 -> last pixel (edge replicated),
  # so the weight on the second row/column is [0, .25, .75, 1] and out = 5 + 4*wy + wx.
  # Pixels outside the crop (e.g. 0 or 15) must never leak in.
  out = aug.apply_rrc(jnp.asarray(ramp_image(4, 4)), jnp.array([1, 1, 2, 2]), (4, 4))
  weights = np.array([0.0, 0.25, 0.75, 1.0])
  expected = 5 + 4 * weights[:, None] + weights[None, :]
  np.testing.assert_allclose(np.asarray(out)[..., 0], expected, atol=1e-6)


@pytest.mark.parametrize("box,out_hw", [((2, 1, 5, 7), (8, 8)), ((0, 3, 7, 4), (5, 6)),
                                        ((1, 0, 3, 9), (7, 7)), ((4, 2, 3, 3), (3, 3))])
def test_rrc_matches_torchvision_reference(box, out_hw):
  image = np.random.default_rng(1).normal(size=(7, 9, 3)).astype(np.float32)
  out = aug.apply_rrc(jnp.asarray(image), jnp.array(box), out_hw)
  np.testing.assert_allclose(np.asarray(out), torch_resized_crop_reference(image, *box, *out_hw), atol=1e-5)


def test_rrc_shared_box_on_a_batch_equals_per_image():
  batch = np.random.default_rng(2).normal(size=(3, 7, 9, 2)).astype(np.float32)
  box = jnp.array([1, 2, 5, 6])
  out = aug.apply_rrc(jnp.asarray(batch), box, (4, 5))
  for b in range(3):
    np.testing.assert_allclose(np.asarray(out[b]), np.asarray(aug.apply_rrc(jnp.asarray(batch[b]), box, (4, 5))),
                               atol=1e-6)


def test_rrc_gradient_matches_finite_differences():
  image = jnp.asarray(np.random.default_rng(3).normal(size=(5, 6, 2)).astype(np.float32))
  box = jnp.array([1, 1, 3, 4])
  probe = jnp.asarray(np.random.default_rng(4).normal(size=(7, 7, 2)).astype(np.float32))

  def loss(x):
    return jnp.sum(aug.apply_rrc(x, box, (7, 7)) * probe)

  grad = np.asarray(jax.jit(jax.grad(loss))(image))
  assert np.abs(grad).sum() > 0
  assert np.all(grad[0] == 0) and np.all(grad[:, 0] == 0)  # pixels outside the crop get no gradient
  eps = 1e-2
  finite_diff = np.zeros(image.shape, np.float32)
  for index in np.ndindex(*image.shape):
    step = jnp.zeros(image.shape).at[index].set(eps)
    finite_diff[index] = (loss(image + step) - loss(image - step)) / (2 * eps)
  np.testing.assert_allclose(grad, finite_diff, atol=2e-3)


def test_rrc_params_inside_image_and_within_scale():
  keys = jax.random.split(jax.random.key(0), 4000)
  boxes = np.asarray(jax.jit(jax.vmap(lambda k: aug.sample_rrc_params(k, (32, 24), (0.08, 1.0))))(keys))
  top, left, height, width = boxes.T
  assert boxes.dtype == np.int32
  assert np.all(top >= 0) and np.all(left >= 0) and np.all(height >= 1) and np.all(width >= 1)
  assert np.all(top + height <= 32) and np.all(left + width <= 24)
  area_fraction = height * width / (32 * 24)
  # Rounding each side to whole pixels moves the area by at most ~ one row and one column.
  assert area_fraction.min() >= 0.08 - 2 * 32 / (32 * 24) and area_fraction.max() <= 1.0
  aspect = width / height
  fitted = ~((height == 32) & (width == 24))  # the centre-crop fallback here is the full image
  assert np.all(aspect[fitted] > 0.6) and np.all(aspect[fitted] < 1.6)
  assert 0.3 < area_fraction.mean() < 0.6  # U(0.08, 1), truncated by the fit test
  # top is uniform over the valid offsets: its mean sits near the middle of them.
  assert abs(np.mean(top[height < 32] / (32 - height[height < 32])) - 0.5) < 0.05


def test_rrc_fallback_centre_crop_and_full_scale():
  # 8x32 (ratio 4): a full-area box never fits, so torchvision's centre fallback h=8, w=round(8*4/3).
  box = jax.jit(lambda k: aug.sample_rrc_params(k, (8, 32), scale=(1.0, 1.0)))(jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(box), [0, 10, 8, 11])
  # Square image, scale (1, 1): always the whole image (RDED's factor-1 case).
  keys = jax.random.split(jax.random.key(2), 200)
  boxes = np.asarray(jax.jit(jax.vmap(lambda k: aug.sample_rrc_params(k, (32, 32), scale=(1.0, 1.0))))(keys))
  np.testing.assert_array_equal(boxes, np.tile([0, 0, 32, 32], (200, 1)))


# ----------------------------------------------------------------------------- flip, roll, crop


def test_flip_mirrors_width_only_when_asked():
  image = jnp.asarray(ramp_image(3, 4, 2))
  np.testing.assert_array_equal(np.asarray(aug.apply_flip(image, jnp.array(True))), np.asarray(image)[:, ::-1])
  np.testing.assert_array_equal(np.asarray(aug.apply_flip(image, jnp.array(False))), np.asarray(image))
  flips = np.asarray(jax.jit(jax.vmap(aug.sample_flip_params))(jax.random.split(jax.random.key(0), 2000)))
  assert flips.dtype == bool and 0.45 < flips.mean() < 0.55


def test_roll_equals_np_roll():
  batch = np.random.default_rng(5).normal(size=(2, 5, 6, 3)).astype(np.float32)
  for shift in [(0, 0), (1, 4), (4, 0), (5, 7)]:
    out = jax.jit(aug.apply_roll)(jnp.asarray(batch), jnp.array(shift))
    np.testing.assert_array_equal(np.asarray(out), np.roll(batch, shift, axis=(1, 2)))
  shifts = np.asarray(jax.jit(jax.vmap(lambda k: aug.sample_roll_params(k, 4)))(jax.random.split(jax.random.key(0), 2000)))
  assert shifts.min() == 0 and shifts.max() == 4 and set(np.unique(shifts)) == {0, 1, 2, 3, 4}


def test_random_crop_equals_slice_of_zero_padded_image():
  image = np.random.default_rng(6).normal(size=(6, 6, 3)).astype(np.float32)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  for top, left in [(0, 0), (8, 8), (3, 6), (4, 4)]:
    out = jax.jit(aug.apply_random_crop, static_argnums=2)(jnp.asarray(image), jnp.array([top, left]), 4)
    np.testing.assert_array_equal(np.asarray(out), padded[top:top + 6, left:left + 6])
  offsets = np.asarray(jax.jit(jax.vmap(lambda k: aug.sample_random_crop_params(k, (6, 6), 4)))(
      jax.random.split(jax.random.key(0), 2000)))
  assert offsets.min() == 0 and offsets.max() == 8


# ----------------------------------------------------------------------------- CutMix


def test_cutmix_box_lambda_and_mixed_batch():
  batch = np.random.default_rng(7).normal(size=(5, 8, 10, 3)).astype(np.float32)
  sample = jax.jit(lambda k: aug.sample_cutmix_params(k, 5, (8, 10)))
  mix = jax.jit(aug.apply_cutmix)
  for seed in range(20):
    params = sample(jax.random.key(seed))
    y0, y1, x0, x1 = np.asarray(params.box)
    assert 0 <= y0 <= y1 <= 8 and 0 <= x0 <= x1 <= 10
    cut_h, cut_w = int(8 * np.sqrt(1 - float(params.lam_drawn))), int(10 * np.sqrt(1 - float(params.lam_drawn)))
    assert y1 - y0 <= 2 * (cut_h // 2) and x1 - x0 <= 2 * (cut_w // 2)
    np.testing.assert_allclose(float(params.lam), 1 - (y1 - y0) * (x1 - x0) / 80, atol=1e-6)
    perm = np.asarray(params.permutation)
    np.testing.assert_array_equal(np.sort(perm), np.arange(5))
    expected = batch.copy()
    expected[:, y0:y1, x0:x1] = batch[perm, y0:y1, x0:x1]
    np.testing.assert_array_equal(np.asarray(mix(jnp.asarray(batch), params)), expected)


def test_cutmix_box_by_hand():
  # Box rows [1, 5), columns [0, 2): 8 pixels of image 0 come from image 1 and vice versa.
  params = aug.CutMixParams(jnp.array([1, 5, 0, 2]), jnp.array([1, 0]), jnp.float32(0.75), jnp.float32(0.9))
  batch = np.stack([np.zeros((8, 10, 1)), np.ones((8, 10, 1))]).astype(np.float32)
  mixed = np.asarray(aug.apply_cutmix(jnp.asarray(batch), params))
  assert mixed[0].sum() == 8 and mixed[1].sum() == 80 - 8
  assert np.all(mixed[0, 1:5, 0:2] == 1) and mixed[0, 0, 0] == 0 and mixed[0, 1, 2] == 0


def test_cutmix_lambda_distribution_uniform():
  params = jax.jit(jax.vmap(lambda k: aug.sample_cutmix_params(k, 4, (32, 32))))(
      jax.random.split(jax.random.key(3), 4000))
  lam_drawn, lam = np.asarray(params.lam_drawn), np.asarray(params.lam)
  assert abs(lam_drawn.mean() - 0.5) < 0.03 and abs(np.median(lam_drawn) - 0.5) < 0.04  # Beta(1, 1)
  assert np.all(lam >= lam_drawn - 1e-6)  # clipping and the even box width only shrink the box
  other_alpha = aug.sample_cutmix_params(jax.random.key(4), 4, (32, 32), alpha=2.0)  # jax.random.beta path
  assert 0.0 < float(other_alpha.lam_drawn) < 1.0 and float(other_alpha.lam) >= float(other_alpha.lam_drawn) - 1e-6


# ----------------------------------------------------------------------------- PatchShuffle


def test_patch_shuffle_known_permutation():
  image = ramp_image(4, 4)
  # 2x2 grid, cells (row-major) 0 1 / 2 3; perm [3, 2, 1, 0] turns the image by 180 degrees per patch block.
  out = np.asarray(aug.apply_patch_shuffle(jnp.asarray(image), jnp.array([3, 2, 1, 0])))[..., 0]
  expected = np.array([[10, 11, 8, 9], [14, 15, 12, 13], [2, 3, 0, 1], [6, 7, 4, 5]], np.float32)
  np.testing.assert_array_equal(out, expected)
  identity = aug.apply_patch_shuffle(jnp.asarray(image), jnp.arange(4))
  np.testing.assert_array_equal(np.asarray(identity), image)


@pytest.mark.parametrize("mode", ["rded", "full"])
def test_patch_shuffle_is_a_permutation_of_patches(mode):
  image = np.random.default_rng(8).normal(size=(6, 9, 2)).astype(np.float32)
  sample = jax.jit(lambda k: aug.sample_patch_shuffle_params(k, 3, mode))
  shuffle = jax.jit(aug.apply_patch_shuffle)
  for seed in range(10):
    perm = np.asarray(sample(jax.random.key(seed)))
    np.testing.assert_array_equal(np.sort(perm), np.arange(9))
    if mode == "rded":  # rows and columns of the grid are permuted independently
      rows, cols = perm.reshape(3, 3) // 3, perm.reshape(3, 3) % 3
      assert np.all(rows == rows[:, :1]) and np.all(cols == cols[:1, :])
    out = np.asarray(shuffle(jnp.asarray(image), jnp.asarray(perm)))
    np.testing.assert_allclose(out.sum(), image.sum(), rtol=1e-5)
    for k, source in enumerate(perm):
      r, c, sr, sc = k // 3, k % 3, source // 3, source % 3
      np.testing.assert_array_equal(out[2 * r:2 * r + 2, 3 * c:3 * c + 3], image[2 * sr:2 * sr + 2, 3 * sc:3 * sc + 3])


def test_patch_shuffle_rejects_indivisible_image():
  with pytest.raises(ValueError, match="grid"):
    aug.apply_patch_shuffle(jnp.zeros((5, 6, 1)), jnp.arange(4))


# ----------------------------------------------------------------------------- recovery (SPEC 4.3)


def test_recover_aug_one_draw_shared_by_the_batch():
  batch = jnp.asarray(np.random.default_rng(9).normal(size=(3, 16, 16, 3)).astype(np.float32))
  params = aug.sample_recover_aug_params(jax.random.key(4), (16, 16), jitter=3)
  assert params.crop.shape == (4,) and params.flip.shape == () and params.shift.shape == (2,)
  out = np.asarray(jax.jit(aug.apply_recover_aug)(batch, params))
  crop = np.asarray(params.crop)
  for b in range(3):  # crop -> flip -> roll, by the numpy reference
    expected = torch_resized_crop_reference(np.asarray(batch[b]), *crop, 16, 16)
    expected = expected[:, ::-1] if bool(params.flip) else expected
    expected = np.roll(expected, tuple(np.asarray(params.shift)), axis=(0, 1))
    np.testing.assert_allclose(out[b], expected, atol=1e-5)


def test_recover_aug_draws_and_flip_switch():
  sample = jax.jit(jax.vmap(lambda k: aug.sample_recover_aug_params(k, (32, 32), 4)))
  params = sample(jax.random.split(jax.random.key(5), 1000))
  assert 0.4 < np.asarray(params.flip).mean() < 0.6
  assert np.asarray(params.shift).min() == 0 and np.asarray(params.shift).max() == 4
  no_flip = jax.jit(jax.vmap(lambda k: aug.sample_recover_aug_params(k, (32, 32), 4, flip=False)))(
      jax.random.split(jax.random.key(5), 100))
  assert not np.asarray(no_flip.flip).any()


def test_recover_aug_per_image_option():
  batch = jnp.asarray(np.random.default_rng(10).normal(size=(4, 16, 16, 3)).astype(np.float32))
  params = jax.jit(lambda k: aug.sample_recover_aug_params(k, (16, 16), 4, batch_size=4))(jax.random.key(6))
  assert params.crop.shape == (4, 4) and params.flip.shape == (4,)
  out = np.asarray(jax.jit(aug.apply_recover_aug)(batch, params))
  for b in range(4):
    single = aug.RecoverAugParams(*(field[b] for field in params))
    np.testing.assert_allclose(out[b], np.asarray(aug.apply_recover_aug(batch[b], single)), atol=1e-6)


def test_recover_aug_gradient_is_the_transpose_of_the_linear_map():
  # apply_recover_aug is linear in the batch, so <A x, y> == <x, A^T y> with A^T from jax.vjp.
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=(2, 12, 12, 3)).astype(np.float32))
  y = jnp.asarray(rng.normal(size=(2, 12, 12, 3)).astype(np.float32))
  params = aug.sample_recover_aug_params(jax.random.key(7), (12, 12), 2)
  out, pullback = jax.vjp(lambda v: aug.apply_recover_aug(v, params), x)
  (x_grad,) = pullback(y)
  np.testing.assert_allclose(float(jnp.vdot(out, y)), float(jnp.vdot(x, x_grad)), rtol=1e-4)


# ----------------------------------------------------------------------------- keys, jit, vmap


def test_same_key_same_params_different_keys_differ():
  key = jax.random.key(8)
  first = aug.sample_recover_aug_params(key, (32, 32), 4)
  again = jax.jit(lambda k: aug.sample_recover_aug_params(k, (32, 32), 4))(key)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  sample_rrc = jax.jit(lambda k: aug.sample_rrc_params(k, (32, 32)))
  crops = {tuple(np.asarray(sample_rrc(jax.random.key(s)))) for s in range(10)}
  assert len(crops) > 5
  legacy_key = jax.random.PRNGKey(8)  # raw uint32 keys work too
  assert aug.sample_cutmix_params(legacy_key, 3, (8, 8)).permutation.shape == (3,)


def test_vmap_over_keys_under_jit_matches_one_by_one():
  images = jnp.asarray(np.random.default_rng(12).normal(size=(4, 10, 10, 3)).astype(np.float32))
  keys = jax.random.split(jax.random.key(9), 4)

  def rrc_flip(image, key):
    crop_key, flip_key = jax.random.split(key)
    image = aug.apply_rrc(image, aug.sample_rrc_params(crop_key, (10, 10), (0.25, 1.0)), (8, 8))
    return aug.apply_flip(image, aug.sample_flip_params(flip_key))

  batched = np.asarray(jax.jit(jax.vmap(rrc_flip))(images, keys))
  assert batched.shape == (4, 8, 8, 3)
  for b in range(4):
    np.testing.assert_allclose(batched[b], np.asarray(rrc_flip(images[b], keys[b])), atol=1e-6)
