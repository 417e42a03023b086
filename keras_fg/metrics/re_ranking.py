"""k-reciprocal re-ranking of re-identification distances (Zhong et al., CVPR 2017)."""

import numpy as np

_ROW_BLOCK = 256  # rows processed at a time where a step would otherwise need a third N×N array


def _is_positive_int(value):
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 1


def _squared_distances(features, metric):
    """Squared Euclidean distances among all rows, built in place in one N×N float32 array.

    For `metric="cosine"` the features are L2-normalised first, which gives 2·(1 − cos).
    """
    features = features.astype(np.float32)
    if metric == "cosine":
        features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    squared_norms = np.einsum("ij,ij->i", features, features)
    distances = features @ features.T
    distances *= -2.0
    distances += squared_norms[:, None]
    distances += squared_norms[None, :]
    return np.maximum(distances, 0.0, out=distances)


def _reciprocal_neighbours(initial_rank, k):
    """The k nearest neighbours of every item, and which of them hold the item among theirs."""
    forward = initial_rank[:, : k + 1]
    backward = initial_rank[forward, : k + 1]  # (N, k+1, k+1): neighbours of each neighbour
    is_reciprocal = (backward == np.arange(len(initial_rank))[:, None, None]).any(axis=2)
    return forward, is_reciprocal


def k_reciprocal_re_ranking(
    query_features,
    gallery_features,
    metric="cosine",
    k1=20,
    k2=6,
    lambda_value=0.3,
    max_items=20_000,
):
    """k-reciprocal re-ranking: query-to-gallery distances refined by shared neighbourhoods.

    With `d(p, g)` the squared Euclidean distance between (L2-normalised, for `"cosine"`)
    features of all `N = Q + G` images, each row divided by its maximum:

        N(p, k)   = the k + 1 nearest images of p (p included)
        R(p, k)   = {g ∈ N(p, k) : p ∈ N(g, k)}                      k-reciprocal neighbours
        R*(p, k)  = R(p, k) ∪ R(q, k/2) for every q ∈ R(p, k) with
                    |R(q, k/2) ∩ R(p, k)| > 2/3 · |R(q, k/2)|          expansion
        V_pg      = exp(−d(p, g)) / Σ_{g' ∈ R*(p, k1)} exp(−d(p, g'))   for g ∈ R*(p, k1), else 0
        V_p      ← mean of V_q over the k2 nearest q of p               local query expansion
        d_J(p, g) = 1 − Σ_j min(V_pj, V_gj) / Σ_j max(V_pj, V_gj)        Jaccard distance
        d*(p, g)  = (1 − λ) · d_J(p, g) + λ · d(p, g)

    This follows the authors' released implementation, which also fixes `k/2` as `round(k1/2)`.
    Rows of V sum to one, so `Σ max = 2 − Σ min`.

    Memory: the method needs every pairwise distance of the `Q + G` images. It holds two
    (Q+G)×(Q+G) float32 arrays at a time, about 8·(Q+G)² bytes (3.2 GB for 20,000 images),
    and refuses more than `max_items` images.

    Args:
        query_features: array `(Q, D)`.
        gallery_features: array `(G, D)`.
        metric: `"cosine"` or `"euclidean"`, as in `evaluate_reid`.
        k1: size of the k-reciprocal neighbourhood (paper: 20).
        k2: size of the local query expansion; 1 disables it (paper: 6).
        lambda_value: weight of the original distance (paper: 0.3).
        max_items: the largest `Q + G` accepted.

    Returns:
        A float32 array `(Q, G)` of re-ranked distances.

    Reference:
        Z. Zhong, L. Zheng, D. Cao, S. Li, "Re-ranking Person Re-identification with
        k-reciprocal Encoding", CVPR 2017.
    """
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"`metric` must be 'cosine' or 'euclidean'. Received: metric={metric!r}")
    if not _is_positive_int(k1):
        raise ValueError(f"`k1` must be a positive integer. Received: k1={k1}")
    if not _is_positive_int(k2):
        raise ValueError(f"`k2` must be a positive integer. Received: k2={k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"`lambda_value` must be in [0, 1]. Received: lambda_value={lambda_value}")
    query_features, gallery_features = np.asarray(query_features), np.asarray(gallery_features)
    if (
        query_features.ndim != 2
        or gallery_features.ndim != 2
        or query_features.shape[1] != gallery_features.shape[1]
    ):
        raise ValueError(
            f"Features must be 2-D with the same dimension. Received shapes "
            f"{query_features.shape} and {gallery_features.shape}."
        )
    num_queries, num_items = len(query_features), len(query_features) + len(gallery_features)
    if num_items > max_items:
        raise ValueError(
            f"Re-ranking needs all pairwise distances of the query and gallery images: "
            f"{num_items} images need about {8 * num_items**2 / 1e9:.1f} GB, above the limit of "
            f"{max_items} images (`max_re_ranking_items`). Evaluate without re-ranking, or raise "
            f"the limit if the memory is there."
        )

    distances = _squared_distances(np.concatenate([query_features, gallery_features]), metric)
    # The reference divides each column by its maximum and transposes; the matrix is symmetric.
    distances /= np.maximum(distances.max(axis=1, keepdims=True), 1e-12)

    rank_width = min(max(k1 + 1, k2), num_items)
    initial_rank = np.empty((num_items, rank_width), dtype=np.int64)
    for start in range(0, num_items, _ROW_BLOCK):
        rows = slice(start, start + _ROW_BLOCK)
        initial_rank[rows] = np.argsort(distances[rows], axis=1)[:, :rank_width]

    forward, is_reciprocal = _reciprocal_neighbours(initial_rank, k1)
    half_forward, half_is_reciprocal = _reciprocal_neighbours(initial_rank, int(np.around(k1 / 2)))
    encodings = np.zeros((num_items, num_items), dtype=np.float32)  # V
    for item in range(num_items):
        neighbours = forward[item][is_reciprocal[item]]
        candidate_sets = half_forward[neighbours]
        candidate_masks = half_is_reciprocal[neighbours]
        overlap = (np.isin(candidate_sets, neighbours) & candidate_masks).sum(axis=1)
        accepted = overlap > 2.0 / 3.0 * candidate_masks.sum(axis=1)
        expansion = np.unique(
            np.concatenate([neighbours, candidate_sets[accepted][candidate_masks[accepted]]])
        )
        weights = np.exp(-distances[item, expansion])
        encodings[item, expansion] = weights / np.sum(weights)

    original = distances[:num_queries, num_queries:].copy()
    del distances  # free the N×N distances before the expansion allocates its own N×N array

    if k2 > 1:
        expanded = np.empty_like(encodings)
        for start in range(0, num_items, _ROW_BLOCK):
            rows = slice(start, start + _ROW_BLOCK)
            expanded[rows] = encodings[initial_rank[rows, :k2]].mean(axis=1)
        encodings = expanded

    gallery_encodings = encodings[num_queries:]
    jaccard = np.empty_like(original)
    for query in range(num_queries):
        support = np.flatnonzero(encodings[query])
        shared = np.minimum(encodings[query, support], gallery_encodings[:, support]).sum(axis=1)
        jaccard[query] = 1.0 - shared / (2.0 - shared)
    return (1.0 - lambda_value) * jaccard + lambda_value * original
