"""DPS's diversity step (SPEC 12, DPS step 4): k-means over a class's kept crops, clusters ranked by
the median representativeness score of their members (lowest = most class-typical first), members
ranked by their distance to the centroid, and the images filled round-robin from the top clusters.
"""

from __future__ import annotations

import numpy as np

KMEANS_ITERATIONS = 100


def kmeans(features: np.ndarray, k: int, rng: np.random.Generator,
           iterations: int = KMEANS_ITERATIONS) -> tuple[np.ndarray, np.ndarray]:
  """Lloyd's k-means with k-means++ seeding from `rng` (float64). Returns (centroids (k', D),
  assignment (N,)), k' = min(k, N); a cluster that empties keeps its centroid."""
  x = np.asarray(features, np.float64)
  n = len(x)
  k = min(int(k), n)
  centroids = np.empty((k, x.shape[1]))
  centroids[0] = x[rng.integers(n)]
  closest = ((x - centroids[0]) ** 2).sum(1)
  for j in range(1, k):
    total = closest.sum()
    pick = rng.choice(n, p=closest / total) if total > 0 else int(rng.integers(n))
    centroids[j] = x[pick]
    closest = np.minimum(closest, ((x - centroids[j]) ** 2).sum(1))
  assignment = np.full(n, -1)
  for _ in range(iterations):
    distances = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
    new = distances.argmin(1)
    if np.array_equal(new, assignment):
      break
    assignment = new
    for j in range(k):
      members = x[assignment == j]
      if len(members):
        centroids[j] = members.mean(0)
  return centroids, assignment


def rank_clusters(scores: np.ndarray, assignment: np.ndarray, num_clusters: int, lowest_first: bool = True) -> list[int]:
  """Non-empty clusters ordered by the median score of their members, lowest first (highest first
  with lowest_first=False; ties by index)."""
  sign = 1.0 if lowest_first else -1.0
  medians = [(sign * float(np.median(scores[assignment == j])), j) for j in range(num_clusters)
             if np.any(assignment == j)]
  return [j for _, j in sorted(medians)]


def rank_members(features: np.ndarray, centroids: np.ndarray, assignment: np.ndarray, cluster: int) -> np.ndarray:
  """Indices of a cluster's members, nearest to its centroid first (ties by index)."""
  members = np.flatnonzero(assignment == cluster)
  distances = ((np.asarray(features, np.float64)[members] - centroids[cluster]) ** 2).sum(1)
  return members[np.argsort(distances, kind="stable")]


def round_robin(ranked_members: list[np.ndarray], count: int) -> list[tuple[int, int]]:
  """`count` picks taking the first member of each cluster in turn, then the second of each, ...;
  returns (cluster position, member index) pairs. Clusters that run out are skipped."""
  picks, depth = [], 0
  while len(picks) < count:
    progressed = False
    for position, members in enumerate(ranked_members):
      if depth < len(members):
        picks.append((position, int(members[depth])))
        progressed = True
        if len(picks) == count:
          break
    if not progressed:
      raise ValueError(f"round_robin: the clusters hold {sum(map(len, ranked_members))} members, {count} asked")
    depth += 1
  return picks


def select(features: np.ndarray, scores: np.ndarray, count: int, *, clusters: int, top_clusters: int,
           rng: np.random.Generator, lowest_first: bool = True) -> dict[str, np.ndarray]:
  """DPS's pick of `count` crops among a class's kept crops.

  Clusters rank by median score, lowest first (the most typical under DPS's `select='min'`;
  `lowest_first=False` for 'max'). Fills round-robin from the `top_clusters` best-ranked clusters; when they hold fewer than `count`
  crops, the next clusters in rank order join (so a class always yields `count` crops when it has
  that many). Returns the picked indices in pick order, each one's cluster, that cluster's rank and
  the member's rank within it.
  """
  if count > len(features):
    raise ValueError(f"select: {count} crops asked from {len(features)}")
  centroids, assignment = kmeans(features, clusters, rng)
  order = rank_clusters(scores, assignment, len(centroids), lowest_first)
  members = [rank_members(features, centroids, assignment, j) for j in order]
  used = min(top_clusters, len(order))
  while sum(len(m) for m in members[:used]) < count:
    used += 1
  picks = round_robin(members[:used], count)
  positions = np.array([p for p, _ in picks])
  index = np.array([i for _, i in picks])
  member_rank = np.array([int(np.flatnonzero(members[p] == i)[0]) for p, i in picks])
  return {"index": index, "cluster": np.array([order[p] for p in positions]), "cluster_rank": positions,
          "member_rank": member_rank, "assignment": assignment}
