"""Parity of every port with torchvision (imagenet stem, width 1): logits and every BN layer's input
mean / biased variance, on random weights with randomized BN affine and running statistics.

Needs torch + torchvision (test/conversion dependencies only). Heavy-ish on CPU: run alone with
`pytest tests/test_torchvision_parity.py`.
"""

import functools

import jax
import numpy as np
import pytest
import torch
import torchvision

from prism_jax import models
from prism_jax.models import torchvision_import

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "shufflenet_v2_x0_5",
         "shufflenet_v2_x1_0", "efficientnet_b0", "alexnet")
NUM_CLASSES = 1000
BATCH = 2

torch.set_num_threads(2)
pytestmark = pytest.mark.usefixtures("optimized_xla")  # parity as users run it: XLA optimizations on


@functools.lru_cache(maxsize=1)
def _torch_model(arch: str):
  torch.manual_seed(0)
  model = getattr(torchvision.models, arch)(weights=None, num_classes=NUM_CLASSES)
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        c = module.num_features
        module.weight.copy_(0.5 + torch.rand(c, generator=gen))
        module.bias.copy_(0.2 * torch.randn(c, generator=gen))
        module.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
        module.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
      elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.bias is not None:
        module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
  return model.eval()


def _torch_forward(model, images_nhwc: np.ndarray):
  """Logits and, in forward order, (mean, biased var) of every BatchNorm2d input."""
  stats = []

  def pre_hook(module, inputs):
    x = inputs[0].detach().double()
    stats.append((x.mean(dim=(0, 2, 3)).numpy(), x.var(dim=(0, 2, 3), unbiased=False).numpy()))

  handles = [m.register_forward_pre_hook(pre_hook) for m in model.modules()
             if isinstance(m, torch.nn.BatchNorm2d)]
  try:
    with torch.no_grad():
      logits = model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()
  finally:
    for handle in handles:
      handle.remove()
  return logits, stats


def _assert_close(actual, expected, what: str):
  expected = np.asarray(expected, np.float64)
  tol = 1e-4 * max(1.0, float(np.max(np.abs(expected))))
  err = float(np.max(np.abs(np.asarray(actual, np.float64) - expected)))
  assert err <= tol, f"{what}: max abs diff {err:.3g} > tolerance {tol:.3g}"


@pytest.mark.parametrize("size", [224, 193])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_bn_stats_match_torchvision(arch, size):
  torch_model = _torch_model(arch)
  state_dict = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  variables = torchvision_import.torchvision_state_dict_to_variables(arch, state_dict)
  model = models.create_model(arch, num_classes=NUM_CLASSES, stem="imagenet", width=1.0)
  torchvision_import.check_variables_match(model, variables, (1, size, size, 3))

  images = np.random.default_rng(size).normal(size=(BATCH, size, size, 3)).astype(np.float32)
  ref_logits, ref_stats = _torch_forward(torch_model, images)
  out = jax.jit(functools.partial(models.forward_with_bn_stats, model))(variables, images)

  _assert_close(out.logits, ref_logits, f"{arch}@{size} logits")
  assert len(out.bn) == len(ref_stats), (len(out.bn), len(ref_stats))
  for index, (stat, (ref_mean, ref_var)) in enumerate(zip(out.bn, ref_stats)):
    assert stat.batch_mean.shape == ref_mean.shape, f"BN {index}: channel count differs"
    _assert_close(stat.batch_mean, ref_mean, f"{arch}@{size} BN {index} input mean")
    _assert_close(stat.batch_var, ref_var, f"{arch}@{size} BN {index} input var")
  if arch == "alexnet":
    assert out.bn == ()


def test_import_tool_writes_a_loadable_teacher(tmp_path):
  from prism_jax.io import teacher_store
  from prism_jax.tools import import_torchvision

  torch_model = _torch_model("shufflenet_v2_x0_5")
  pth = tmp_path / "shufflenet.pth"
  torch.save(torch_model.state_dict(), pth)
  out_dir = tmp_path / "teacher"
  assert import_torchvision.main(["--arch", "shufflenet_v2_x0_5", "--pth", str(pth),
                                  "--out", str(out_dir)]) == 0
  model, variables, meta = teacher_store.load_teacher(str(out_dir))
  assert meta["model"] == dict(name="shufflenet_v2_x0_5", num_classes=NUM_CLASSES, stem="imagenet",
                               width=1.0)
  images = np.random.default_rng(0).normal(size=(BATCH, 97, 97, 3)).astype(np.float32)
  ref_logits, _ = _torch_forward(torch_model, images)
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  _assert_close(logits, ref_logits, "imported teacher logits")

  assert meta["class_names"] == list(import_torchvision.imagenet_class_names())  # 1000-class head

  # Class names from a file travel with the teacher; a 1000-class head defaults to the synset ids.
  names = tmp_path / "names.txt"
  names.write_text("".join(f"class_{i}\n" for i in range(NUM_CLASSES)))
  assert import_torchvision.main(["--arch", "shufflenet_v2_x0_5", "--pth", str(pth), "--out",
                                  str(tmp_path / "named"), "--class-names", str(names)]) == 0
  assert teacher_store.load_meta(str(tmp_path / "named"))["class_names"][-1] == f"class_{NUM_CLASSES - 1}"
  synsets = import_torchvision.imagenet_class_names()
  assert len(synsets) == 1000 and synsets[:2] == ("n01440764", "n01443537") and synsets[-1] == "n15075141"

  # A wrong class count fails with the offending key named, and writes nothing.
  assert import_torchvision.main(["--arch", "shufflenet_v2_x0_5", "--pth", str(pth),
                                  "--out", str(tmp_path / "bad"), "--num-classes", "10"]) == 1
  assert not teacher_store.is_complete(str(tmp_path / "bad"))
