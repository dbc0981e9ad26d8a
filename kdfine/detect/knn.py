"""``--method knn``: each label against the labels of its k nearest neighbours (cosine), as SimiFeat
(Zhu et al., ICML 2022) does, from features alone: no training, so it works on the features of a
pretrained backbone (``train-teacher --pretrained --epochs 0``, then ``eval --dump-features``).

score_i = the fraction of i's k nearest neighbours (cosine similarity of the L2-normalised
features, i itself excluded) that carry i's label; i is kept when its label is a most frequent
label among them (the neighbours' majority vote; a tie that includes i's label keeps it).

The neighbours are searched among a reference set: all rows when N <= ``reference`` (exact), else
``reference`` rows drawn without replacement (seeded). Up to ``EXACT_MAX`` (50,000) rows the search
is a blocked matrix product (query blocks of ``block`` rows against the reference set, float32 BLAS,
top-k by ``argpartition``), which is what scikit-learn's brute-force ``NearestNeighbors`` does for
cosine; the reference rows are read with positional reads and the queries streamed in blocks, so
the resident memory is the reference set (reference x D float32: 20 MB at 10,000 x 512) plus one
block of similarities. An exact search of 1M rows would be N^2 D = 5e14 multiply-adds, hours on a
CPU; the reference set bounds it at N x reference x D (5e12 at 1M: 160-280 s on two cores, most of
it the top-k partition of a million 10,000-wide rows).

Above ``EXACT_MAX`` rows the same reference set is searched through its clusters
(:func:`_clustered_labels`): spherical k-means splits it into ``CLUSTERS`` (200) groups, and each
row is compared only with the members of its ``PROBES`` (3) nearest centroids (about 130 of the
10,000 reference rows on the benchmark's features, the clusters being uneven), an approximate
search. Measured against the exact search of the same reference set on ``bench/fine_scaling.py``'s
synthetic features (100 classes, 30% wrong labels, 100,000 x 512): knn's keep decisions agree on
99.993% of the rows and its neighbour counts on 99.05% (200 clusters with 1, 2, 4 probes: 99.895%,
99.990%, 99.995%; 100 clusters with 2 probes: 99.950%), and auto keeps exactly the same samples at a
fifth of its CPU time (5.4 against 28.9 s); at 1M rows auto's kept set has Jaccard 0.99999 with the
previous code's exact search (bench/RESULTS.md, "detect-noise at 1M x 512 (issue 23, item 4)"). Sets
of up to 50,000 rows, the benchmark's and CIFAR's among them, get the exact search and the same
results as before. Each block of the clustered search is cut into one slice of rows per thread, and
a thread runs every step of its slice; the rows are normalised into a reused buffer in the order of
their nearest centroid (found from the raw rows: the order does not depend on a row's norm), so the
first probe's products read them in place (knn at 1M x 512: 8.6 s wall against 11.9 for one thread
doing the centroid products and normalising into fresh arrays; the same neighbours).
"""

from __future__ import annotations

import threading
from typing import Iterator

import numpy as np

from kdfine.detect.base import DETECTORS, Detection, Scratch, class_report, gather, groups_of
from kdfine.files.rows import row_blocks, take_rows
from kdfine.runtime.threads import Workers, cpu_threads, row_slices

K = 10
REFERENCE = 10_000
BLOCK = 2048
EXACT_MAX = 50_000  # above this many rows (CIFAR's 50,000 training rows: exact), the reference set is searched through its clusters
CLUSTERS = 200  # spherical k-means clusters of the reference set
PROBES = 3  # a query row is compared with the members of its PROBES nearest centroids
KMEANS_ITERATIONS = 10
CLUSTER_BLOCK = 32768  # query rows per block of the clustered search, one slice per thread (16,384 on two: 8.7-9.3 s
# for knn at 1M x 512 against 11.3-11.5 with blocks of 16,384, whose slices' many small products cost more)


def _normalised(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The rows of ``x`` (n, D) scaled to unit L2 norm as float32 (zero rows stay zero), into ``out``
    if given (it may be ``x`` itself)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("nd,nd->n", x, x))
    return np.divide(x, np.maximum(norms, np.finfo(np.float32).tiny)[:, None], out=out)


def reference_rows(n: int, reference: int = REFERENCE, seed: int = 0) -> np.ndarray:
    """Sorted indices of the reference set: all n rows, or ``reference`` of them (seeded)."""
    if n <= reference:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, reference, replace=False))


def reference_positions(ref: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(n,) each of ``rows``' position in the sorted reference set ``ref``, or -1 where it is not a
    reference row (a reference row is not its own neighbour)."""
    pos = np.minimum(np.searchsorted(ref, rows), ref.size - 1)
    return np.where(ref[pos] == rows, pos, -1)


def neighbour_labels(features, labels: np.ndarray, *, k: int = K, reference: int = REFERENCE, seed: int = 0,
                     block: int = BLOCK, exact_max: int = EXACT_MAX) -> Iterator[tuple[int, np.ndarray]]:
    """``(lo, nb)`` per block of rows: nb (b, k) the labels of rows lo..lo+b-1's k nearest reference
    rows by cosine similarity, nearest first (a row is never its own neighbour); for N above
    ``exact_max``, the nearest among the members listed under the row's nearest centroid
    (:func:`_clustered_labels`). features: (N, D) array or memmap; labels: (N,)."""
    n = features.shape[0]
    ref = reference_rows(n, reference, seed)
    k = min(k, ref.size - 1 if ref.size == n else ref.size)
    if k < 1:
        raise ValueError("knn needs at least 2 samples")
    refx = _normalised(take_rows(features, ref))
    ref_labels = labels[ref]
    if n > exact_max:
        yield from _clustered_labels(features, ref, refx, ref_labels, k, seed)
        return
    for lo, rows in row_blocks(features, block):
        sims = _normalised(rows) @ refx.T  # (b, reference)
        own = reference_positions(ref, np.arange(lo, lo + rows.shape[0]))
        mine = np.flatnonzero(own >= 0)
        sims[mine, own[mine]] = -np.inf  # a row is not its own neighbour
        top = np.argpartition(sims, sims.shape[1] - k, axis=1)[:, -k:]  # no negated copy of the block
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        yield lo, ref_labels[np.take_along_axis(top, order, axis=1)]


def _clustered_labels(features, ref: np.ndarray, refx: np.ndarray, ref_labels: np.ndarray, k: int,
                      seed: int) -> Iterator[tuple[int, np.ndarray]]:
    """The k nearest reference rows searched through clusters of the reference set: spherical
    k-means (``CLUSTERS`` centroids, seeded) splits the reference set; a query row is compared with
    the members of its ``PROBES`` nearest centroids only, and the k nearest of those are its
    neighbours. Each block's rows are cut into one slice per thread, and a thread runs every step
    of its slice (normalising, the centroid products, the members' products, the top k): one
    thread for the centroid products alone left the other core idle for a quarter of the search."""
    threads = cpu_threads()
    with Workers(threads) as pool:  # its BLAS limit also keeps the k-means' products on one thread
        index = _ClusterIndex(refx, _spherical_kmeans(refx, min(CLUSTERS, refx.shape[0]), seed), ref, ref_labels)
        scratch = [Scratch() for _ in range(threads)]
        for lo, rows in row_blocks(features, CLUSTER_BLOCK):
            nb = np.empty((rows.shape[0], k), dtype=ref_labels.dtype)
            pool.run(_search_slice, [(index, rows[a:b], lo + a, k, nb[a:b], scratch[w])
                                     for w, (a, b) in enumerate(row_slices(rows.shape[0], threads))])
            yield lo, nb


class _ClusterIndex:
    """The reference set split by its nearest centroid: ``centroids`` (C, D) unit rows, and per
    centroid its ``members`` (positions in the reference set) and their unit rows (``member_rows``);
    ``owner`` (R,) each reference row's centroid and ``slot`` (R,) its place in that list."""

    def __init__(self, refx: np.ndarray, centroids: np.ndarray, ref: np.ndarray, ref_labels: np.ndarray):
        self.centroids, self.ref, self.ref_labels = centroids, ref, ref_labels
        self.owner = np.argmax(refx @ centroids.T, axis=1)
        self.members = [np.flatnonzero(self.owner == c) for c in range(centroids.shape[0])]
        self.member_rows = [np.ascontiguousarray(refx[m]) for m in self.members]
        self.slot = np.empty(ref.size, dtype=np.int64)
        for m in self.members:
            self.slot[m] = np.arange(m.size)
        self.probes = min(PROBES, centroids.shape[0])


def _search_slice(index: _ClusterIndex, rows: np.ndarray, lo: int, k: int, out: np.ndarray, scratch: Scratch) -> None:
    """``out`` (n, k): the labels of the k most similar members of the ``index.probes`` clusters
    nearest to each of ``rows`` (n, D), nearest first; rows lo..lo+n-1 of the features (a row that
    is a reference row is not its own neighbour)."""
    n, probes, ref = rows.shape[0], index.probes, index.ref
    # a row's nearest centroids do not depend on its norm: found from the raw rows, they let the unit
    # rows be written in the order of their nearest centroid, so that its products read them in place
    near = _nearest_centroids(np.asarray(rows, np.float32) @ index.centroids.T, probes)  # (n, probes)
    order = np.argsort(near[:, 0], kind="stable")
    q = gather(rows, order, scratch, np.float32)  # q[i] is rows[order[i]], in a reused buffer (a fresh
    q = _normalised(q, out=q)  # 2 GB of arrays over a 1M x 512 search paid its page faults: 2 of 12 s)
    near, rows_at = near[order], lo + order
    own = reference_positions(ref, rows_at)
    sims = np.full((n, probes * k), -np.inf, dtype=np.float32)
    cand = np.zeros((n, probes * k), dtype=np.int64)  # positions in the reference set
    for j in range(probes):
        for c, idx in groups_of(near[:, j]):
            at = slice(idx[0], idx[-1] + 1) if j == 0 else idx  # the first probe's rows are contiguous
            _search_cluster(index, c, q[at], own[at], k, sims, cand, at, j * k)
    top = _top_columns(sims, k)
    best = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
    out[order] = index.ref_labels[np.take_along_axis(cand, np.take_along_axis(top, best, axis=1), axis=1)]


def _search_cluster(index: _ClusterIndex, c: int, q: np.ndarray, own: np.ndarray, k: int, sims: np.ndarray,
                    cand: np.ndarray, idx: np.ndarray, col: int) -> None:
    """The k most similar members of centroid c for the unit rows ``q`` (rows ``idx`` of the slice)
    into columns col..col+k of ``sims`` and ``cand`` (fewer members: the rest stay -inf)."""
    m = index.members[c]
    if m.size == 0:
        return
    s = q @ index.member_rows[c].T  # (queries, members of c)
    mine = np.flatnonzero(own >= 0)
    mine = mine[index.owner[own[mine]] == c]
    s[mine, index.slot[own[mine]]] = -np.inf  # a row is not its own neighbour
    take = min(k, m.size)  # argpartition: on rows of about 100, faster than _top_columns' passes
    top = np.argpartition(s, m.size - take, axis=1)[:, -take:] if take < m.size else _top_columns(s, take)
    sims[idx, col:col + take] = np.take_along_axis(s, top, axis=1)
    cand[idx, col:col + take] = m[top]


def _nearest_centroids(sims: np.ndarray, probes: int) -> np.ndarray:
    """(b, probes) the columns of the ``probes`` largest entries of each row, largest first."""
    sims = sims.copy()
    rows = np.arange(sims.shape[0])
    out = np.empty((sims.shape[0], probes), dtype=np.int64)
    for j in range(probes):
        out[:, j] = np.argmax(sims, axis=1)
        sims[rows, out[:, j]] = -np.inf
    return out


def _top_columns(s: np.ndarray, k: int) -> np.ndarray:
    """(n, k) column indices of the k largest entries of each row of ``s`` (n, m), in no order.
    np.partition finds each row's k-th largest value (3-5x faster than argpartition on rows of
    100-600); the rows where more than k entries reach it (ties) go through argpartition."""
    n, m = s.shape
    if k >= m:
        return np.broadcast_to(np.arange(m), (n, m))
    kth = np.partition(s, m - k, axis=1)[:, m - k]
    hit = s >= kth[:, None]
    plain = hit.sum(axis=1) == k
    out = np.empty((n, k), dtype=np.int64)
    out[plain] = np.nonzero(hit[plain])[1].reshape(-1, k)
    tied = ~plain
    if tied.any():
        out[tied] = np.argpartition(s[tied], m - k, axis=1)[:, -k:]
    return out


def _spherical_kmeans(x: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """(clusters, D) unit centroids of the unit rows ``x``: Lloyd iterations on cosine similarity
    from ``clusters`` rows drawn with ``seed``; an emptied cluster keeps its centroid."""
    rng = np.random.default_rng([seed, 1])
    centroids = x[np.sort(rng.choice(x.shape[0], clusters, replace=False))].copy()
    for _ in range(KMEANS_ITERATIONS):
        assign = np.argmax(x @ centroids.T, axis=1)
        onehot = np.zeros((x.shape[0], clusters), dtype=x.dtype)
        onehot[np.arange(x.shape[0]), assign] = 1
        sums = onehot.T @ x
        used = np.bincount(assign, minlength=clusters) > 0
        centroids[used] = _normalised(sums[used])
    return centroids


def knn_split(features, labels, *, k: int = K, reference: int = REFERENCE, seed: int = 0,
              exact_max: int = EXACT_MAX) -> tuple[np.ndarray, np.ndarray]:
    """``keep`` (N,) bool (the label is a most frequent neighbour label) and ``score`` (N,) the
    fraction of the k neighbours that share the label."""
    own, other, k = knn_counts(features, labels, k=k, reference=reference, seed=seed, exact_max=exact_max)
    return own >= other, own / k


def knn_counts(features, labels, *, k: int = K, reference: int = REFERENCE, seed: int = 0,
               exact_max: int = EXACT_MAX, stop: threading.Event | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Per row, how many of its k nearest neighbours carry its label (``own``, (N,)) and the count of
    the most frequent *other* label among them (``other``, (N,), 0 when all agree); and k as used.
    ``stop``: when set (by a caller that runs this beside other work and failed), the search ends
    after the current block and the counts are incomplete."""
    labels = np.asarray(labels, dtype=np.int64)
    own = np.empty(labels.size, dtype=np.int64)
    other = np.empty(labels.size, dtype=np.int64)
    used = k
    for lo, nb in neighbour_labels(features, labels, k=k, reference=reference, seed=seed, exact_max=exact_max):
        if stop is not None and stop.is_set():
            break
        y = labels[lo:lo + nb.shape[0]]
        same = nb == y[:, None]
        counts = (nb[:, :, None] == nb[:, None, :]).sum(axis=2)  # each neighbour's label's count
        own[lo:lo + y.size] = same.sum(axis=1)
        other[lo:lo + y.size] = np.where(same, 0, counts).max(axis=1)
        used = nb.shape[1]
    return own, other, used


@DETECTORS.register("knn", title="knn agreement", xlabel="share of the nearest neighbours with the same label")
def knn_detect(features, labels, num_classes: int, *, seed: int = 0, **_) -> Detection:
    """:func:`knn_split` as a :class:`Detection`; ``p_clean`` is the neighbours' agreement."""
    keep, scores = knn_split(features, labels, seed=seed)
    detail = {"k": K, "reference": int(min(labels.size, REFERENCE)),
              "search": "exact" if labels.size <= EXACT_MAX else f"{CLUSTERS} clusters, {PROBES} probed"}
    return Detection(np.flatnonzero(keep), scores, scores.copy(), None, class_report(keep, scores, labels, num_classes),
                     "knn", detail)
