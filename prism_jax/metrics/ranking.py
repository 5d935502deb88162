"""DD-Ranking's label-robust metrics (Li et al. 2025, the field's evaluation toolkit), per set:

  HLR = Acc(real, hard) − Acc(set, hard)           hard-label recovery: the gap to a student trained
                                                   on the full real training set with hard labels
  IOR = Acc(set, protocol) − Acc(random real, protocol)   improvement over random real images of the
                                                   same size under the same protocol
  LRS = (exp(α) − exp(−1)) / (e − exp(−1)) · 100,  α = w · IOR − (1 − w) · HLR, accuracies as fractions
                                                   (w = 0.5 by default, DD-Ranking's leaderboard)

The random baseline is drawn with several seeds (several random-real sets): IOR is measured against
their mean and shown with their spread (the standard deviation of their accuracies), so an IOR inside
that spread reads as no difference.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence


def lrs(ior: float, hlr: float, weight: float = 0.5) -> float:
  """LRS in % from IOR and HLR given as fractions (0.05 = 5 points)."""
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f"weight={weight}: expected a value in [0, 1]")
  alpha = weight * ior - (1.0 - weight) * hlr
  return (math.exp(alpha) - math.exp(-1.0)) / (math.e - math.exp(-1.0)) * 100.0


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  mean = sum(values) / len(values)
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def columns(top1: Mapping[str, float], *, random_sets: Sequence[str], hard_top1: Mapping[str, float] | None = None,
            full_top1: float | None = None, weight: float = 0.5) -> dict[str, dict]:
  """Per set label: {'ior': {'mean', 'std'}, 'hlr', 'lrs'} in percentage points (LRS in %).

  top1: each set's mean top-1 (%) under this run's protocol; random_sets: the labels of the random-real
  sets (one per seed) among them; hard_top1: each set's top-1 (%) under the hard-label protocol (None:
  no HLR or LRS); full_top1: the full-data hard-label top-1 (%). A value that cannot be computed is None.
  """
  randoms = [top1[r] for r in random_sets if top1.get(r) is not None]
  base, spread = _mean_std(randoms) if randoms else (None, None)
  out = {}
  for label, acc in top1.items():
    ior = None if acc is None or base is None else {"mean": acc - base, "std": spread}
    hard = None if hard_top1 is None else hard_top1.get(label)
    hlr = None if hard is None or full_top1 is None else full_top1 - hard
    score = None if ior is None or hlr is None else lrs(ior["mean"] / 100.0, hlr / 100.0, weight)
    out[label] = {"ior": ior, "hlr": hlr, "lrs": score}
  return out
