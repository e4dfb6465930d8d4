"""How ``imgtune suggest`` picks a batch of images to label: pure functions over arrays (no model, no files).

Two families, because the active-learning literature finds that neither wins at every budget:

- uncertainty (``margin``, ``entropy``): the images the model is least sure of. Strong once the model is
  good; with a handful of labels per class it picks outliers and confusing images and loses to random
  selection (the "cold start" of Hacohen et al. 2022, and docs/benchmarks.md, "Active learning");
- coverage (``typical``, TypiClust, Hacohen, Dekel & Weinshall, "Active Learning on a Budget", ICML 2022):
  k-means on the features into (labelled + budget) clusters; take the clusters holding the fewest
  labelled images, from each its most *typical* image (the highest inverse mean distance to its nearest
  neighbours). Wins with few labels, where what matters is that every mode of the data is labelled once;
- ``badge`` (Ash et al., "Deep Batch Active Learning by Diverse, Uncertain Gradient Lower Bounds",
  ICLR 2020): k-means++ seeding on the gradient the head's loss would have for each image under its own
  guess, so the batch is both uncertain (long gradients) and diverse (different directions).

Features are L2-normalised first (cosine geometry, as TypiClust's self-supervised embeddings are).
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans, kmeans_plusplus
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import normalize

NEIGHBOURS = 20  # TypiClust's k for typicality
MIN_CLUSTER = 5  # TypiClust: smaller clusters are outliers, never sampled while larger ones are left
MAX_CLUSTERS = 500  # TypiClust's cap; above MINIBATCH clusters, MiniBatchKMeans keeps it fast
MINIBATCH = 50


def one_minus_margin(probs: np.ndarray) -> np.ndarray:
    top = np.sort(probs, axis=1)[:, ::-1]
    return 1.0 - (top[:, 0] - top[:, 1])


def entropy(probs: np.ndarray) -> np.ndarray:
    return -(probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=1)


def typicality(vectors: np.ndarray, neighbours: int = NEIGHBOURS) -> np.ndarray:
    """1 / mean distance to the ``neighbours`` nearest other rows: high in the dense middle of a cluster."""
    if len(vectors) < 2:
        return np.ones(len(vectors))
    k = min(neighbours, len(vectors) - 1)
    distances, _ = NearestNeighbors(n_neighbors=k + 1).fit(vectors).kneighbors(vectors)
    return 1.0 / (distances[:, 1:].mean(axis=1) + 1e-5)


def typical_clusters(pool: np.ndarray, labelled: np.ndarray, n: int, seed: int = 0) -> list[int]:
    """TypiClust: ``n`` rows of ``pool``, each the most typical of a cluster with the fewest labelled
    rows (ties: the largest cluster), so every dense region gets labelled before any gets a second label."""
    n = min(n, len(pool))
    points = normalize(np.vstack([labelled, pool]) if len(labelled) else pool)
    clusters = _clusters(points, min(len(labelled) + n, MAX_CLUSTERS, len(points)), seed)
    owners = clusters[len(labelled):]
    sizes = np.bincount(clusters, minlength=clusters.max() + 1)
    counts = np.bincount(clusters[:len(labelled)], minlength=len(sizes)).astype(float)
    counts[sizes < _outlier_size(len(points), len(sizes))] = np.inf  # outliers last
    free = np.ones(len(pool), dtype=bool)
    typical: dict[int, np.ndarray] = {}  # a cluster's typicality, computed once however often it is chosen
    chosen: list[int] = []
    while len(chosen) < n:
        open_ = np.bincount(owners[free], minlength=len(sizes)) > 0  # clusters with pool images left
        if not open_.any():
            break
        if not np.isfinite(counts[open_]).any():
            counts[open_] = 0.0  # only outlier clusters left
        order = np.lexsort((-sizes, np.where(open_, counts, np.inf)))
        cluster = int(order[0])
        members = np.flatnonzero(clusters == cluster)
        if cluster not in typical:
            typical[cluster] = typicality(points[members])
        scores = typical[cluster]
        candidates = [(s, m - len(labelled)) for s, m in zip(scores, members)
                      if m >= len(labelled) and free[m - len(labelled)]]
        best = max(candidates)[1]
        chosen.append(int(best))
        free[best] = False
        counts[cluster] += 1
    return chosen


def _outlier_size(points: int, clusters: int) -> int:
    """Clusters smaller than this are outliers: TypiClust's 5, or half the mean cluster size where the
    pool is small against the number of clusters (else most clusters would be "outliers")."""
    return max(2, min(MIN_CLUSTER, points // (2 * clusters)))


def _clusters(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    if k >= len(points):
        return np.arange(len(points))
    kind = KMeans(k, n_init=1, random_state=seed) if k <= MINIBATCH else \
        MiniBatchKMeans(k, n_init=3, batch_size=max(1024, 5 * k), random_state=seed)
    return kind.fit_predict(points)


def gradient_embeddings(probs: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """BADGE: the gradient of the cross-entropy under the model's own guess with respect to a linear
    head's weights, ``(p - onehot(guess)) ⊗ x``, one row per image."""
    residual = probs.copy()
    residual[np.arange(len(probs)), probs.argmax(axis=1)] -= 1.0
    return (residual[:, :, None] * vectors[:, None, :]).reshape(len(probs), -1)


def badge(probs: np.ndarray, vectors: np.ndarray, n: int, seed: int = 0) -> list[int]:
    """``n`` rows by k-means++ seeding (scikit-learn's) on the gradient embeddings: far apart, and long."""
    n = min(n, len(probs))
    embeddings = gradient_embeddings(probs, vectors)
    if not np.any(embeddings):  # every guess certain: no gradient to tell images apart
        return list(range(n))
    _, picked = kmeans_plusplus(embeddings, n, random_state=seed)
    chosen = list(dict.fromkeys(int(i) for i in picked))  # repeats where rows coincide
    taken = set(chosen)
    rest = [int(i) for i in np.argsort(-one_minus_margin(probs), kind="stable") if int(i) not in taken]
    return chosen + rest[:n - len(chosen)]
