"""Person re-identification evaluation: CMC, mAP and mINP under the Market-1501 protocol, or
without camera ids (every other image of a person a true match)."""

import numpy as np

from keras_fg.metrics.re_ranking import _is_positive_int, k_reciprocal_re_ranking

METRICS = ("cosine", "euclidean")


def _as_features(features, name):
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(
            f"`{name}` must be 2-D (num_images, feature_dim). Received shape {features.shape}."
        )
    if features.shape[0] == 0:
        raise ValueError(f"`{name}` is empty: there is nothing to evaluate.")
    # Keep float64 input in float64; everything else is computed in float32.
    return features.astype(np.result_type(features.dtype, np.float32), copy=False)


def _as_vector(values, name, length):
    values = np.asarray(values)
    if values.ndim != 1 or len(values) != length:
        raise ValueError(
            f"`{name}` must be 1-D with one entry per image ({length}). "
            f"Received shape {values.shape}."
        )
    return values


def _check_metric(metric):
    if metric not in METRICS:
        raise ValueError(f"`metric` must be one of {METRICS}. Received: metric={metric!r}")


def pairwise_distances(x, y, metric="cosine"):
    """Distances between every row of `x` and every row of `y`.

        cosine:    d(a, b) = 1 − a·b / (‖a‖ ‖b‖)               in [0, 2]
        euclidean: d(a, b) = sqrt(max(‖a‖² + ‖b‖² − 2 a·b, 0))

    Args:
        x: array `(M, D)`.
        y: array `(N, D)`.
        metric: `"cosine"` or `"euclidean"`.

    Returns:
        An array `(M, N)` in the floating dtype of the inputs (float32 unless they are float64).
    """
    _check_metric(metric)
    x, y = _as_features(x, "x"), _as_features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"Feature dimensions differ: x has {x.shape[1]}, y has {y.shape[1]}.")
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        return 1.0 - x @ y.T
    squared = np.sum(x * x, axis=1)[:, None] + np.sum(y * y, axis=1)[None, :] - 2.0 * (x @ y.T)
    return np.sqrt(np.maximum(squared, 0.0))


def _score_queries(distances, query_ids, query_cameras, gallery_ids, gallery_cameras):
    """Ranks the gallery for a block of queries and scores each ranking.

    Returns (valid, first, average_precision, inverse_negative_penalty) per query, where `first`
    is the 1-based rank of the first true match among the kept gallery images.
    """
    order = np.argsort(distances, axis=1)
    ranked_ids = gallery_ids[order]
    same_id = ranked_ids == query_ids[:, None]
    same_camera = gallery_cameras[order] == query_cameras[:, None]
    keep = ~(same_id & same_camera) & (ranked_ids != -1)
    matches = same_id & keep
    del order, ranked_ids, same_id, same_camera

    positions = np.cumsum(keep, axis=1, dtype=np.int32)  # 1-based rank among kept images
    num_matches = matches.sum(axis=1)
    valid = num_matches > 0
    rows = np.arange(len(matches))
    first = positions[rows, np.argmax(matches, axis=1)]
    last = positions[rows, matches.shape[1] - 1 - np.argmax(matches[:, ::-1], axis=1)]

    # AP = mean over true matches of the precision at that match's rank.
    match_rows, match_columns = np.nonzero(matches)
    hits_so_far = np.cumsum(matches, axis=1, dtype=np.int32)[match_rows, match_columns]
    precision = hits_so_far / positions[match_rows, match_columns]
    sum_precision = np.bincount(match_rows, weights=precision, minlength=len(matches))
    denominator = np.maximum(num_matches, 1)
    return valid, first, sum_precision / denominator, num_matches / np.maximum(last, 1)


def evaluate_reid(
    query_features,
    query_ids,
    query_cameras,
    gallery_features,
    gallery_ids,
    gallery_cameras,
    metric="cosine",
    ranks=(1, 5, 10),
    re_ranking=False,
    batch_size=256,
    k1=20,
    k2=6,
    lambda_value=0.3,
    max_re_ranking_items=20_000,
):
    """Re-identification accuracy under the Market-1501 protocol: CMC, mAP and mINP.

    For each query the gallery is sorted by distance (exact ties in no particular order), then:

    - gallery images with the query's person id **and** camera are dropped (the same person seen
      by the same camera is too easy a match);
    - gallery images with person id −1 ("junk") are dropped too. `keras_fg.data`'s Market-1501
      reader already leaves them out; the rule here makes features from other sources safe.
      Distractors (id 0) stay in the gallery as negatives;
    - a query left with no true match is skipped and counted in `num_skipped_queries`, and the
      averages are taken over the remaining valid queries.

    With `r_1 < r_2 < … < r_m` the 1-based ranks of the query's `m` true matches in the kept list:

        CMC@k = fraction of valid queries with r_1 ≤ k
        AP    = (1/m) · Σ_j  j / r_j                 (precision at each true match)
        INP   = m / r_m                              (the hardest, last, true match)

    and `mAP`, `mINP` are their means over valid queries (Ye et al., TPAMI 2021, for mINP).

    Distances are computed `batch_size` queries at a time — a block's distances, sort and scores
    are discarded before the next block — so memory grows with `batch_size × G`, not `Q × G`:
    20,000 × 20,000 fits easily. k-reciprocal re-ranking needs all pairwise distances of the
    `Q + G` images at once (about 8·(Q+G)² bytes); it refuses inputs beyond
    `max_re_ranking_items` images rather than exhaust memory.

    Args:
        query_features: array `(Q, D)` of query embeddings.
        query_ids: integer person ids `(Q,)`.
        query_cameras: integer camera ids `(Q,)`.
        gallery_features: array `(G, D)` of gallery embeddings.
        gallery_ids: integer person ids `(G,)`; −1 marks junk images, which are ignored.
        gallery_cameras: integer camera ids `(G,)`.
        metric: `"cosine"` (1 − cos) or `"euclidean"`.
        ranks: the CMC ranks to report, e.g. `(1, 5, 10)` gives `rank1`, `rank5`, `rank10`.
        re_ranking: apply k-reciprocal re-ranking (Zhong et al., CVPR 2017) before scoring.
        batch_size: number of queries scored at a time.
        k1, k2, lambda_value: re-ranking parameters (the paper's defaults).
        max_re_ranking_items: the largest `Q + G` re-ranking accepts.

    Returns:
        A dict with `rank{k}` for each k in `ranks`, `mAP`, `mINP` (fractions in [0, 1]),
        `num_valid_queries`, `num_skipped_queries` and `num_queries`.

    Example:

    ```python
    results = evaluate_reid(query_embeddings, query_ids, query_cams,
                            gallery_embeddings, gallery_ids, gallery_cams)
    print(f"rank-1 {results['rank1']:.1%}  mAP {results['mAP']:.1%}")
    ```

    Reference:
        Zheng et al., "Scalable Person Re-identification: A Benchmark", ICCV 2015 (Market-1501).
        Ye et al., "Deep Learning for Person Re-identification: A Survey and Outlook",
        TPAMI 2021 (mINP).
    """
    query_features = _as_features(query_features, "query_features")
    gallery_features = _as_features(gallery_features, "gallery_features")
    if query_features.shape[1] != gallery_features.shape[1]:
        raise ValueError(
            f"Query and gallery features have different dimensions: "
            f"{query_features.shape[1]} vs {gallery_features.shape[1]}."
        )
    num_queries, num_gallery = len(query_features), len(gallery_features)
    query_ids = _as_vector(query_ids, "query_ids", num_queries)
    query_cameras = _as_vector(query_cameras, "query_cameras", num_queries)
    gallery_ids = _as_vector(gallery_ids, "gallery_ids", num_gallery)
    gallery_cameras = _as_vector(gallery_cameras, "gallery_cameras", num_gallery)
    _check_metric(metric)
    ranks = tuple(ranks)
    if not ranks or not all(_is_positive_int(k) for k in ranks):
        raise ValueError(f"`ranks` must be positive integers. Received: ranks={ranks}")
    if not _is_positive_int(batch_size):
        raise ValueError(
            f"`batch_size` must be a positive integer. Received: batch_size={batch_size}"
        )

    if re_ranking:
        all_distances = k_reciprocal_re_ranking(
            query_features,
            gallery_features,
            metric=metric,
            k1=k1,
            k2=k2,
            lambda_value=lambda_value,
            max_items=max_re_ranking_items,
        )

    blocks = []
    for start in range(0, num_queries, batch_size):
        block = slice(start, start + batch_size)
        if re_ranking:
            distances = all_distances[block]
        else:
            distances = pairwise_distances(query_features[block], gallery_features, metric)
        blocks.append(
            _score_queries(
                distances, query_ids[block], query_cameras[block], gallery_ids, gallery_cameras
            )
        )
    valid, first, average_precision, inverse_negative_penalty = (
        np.concatenate(parts) for parts in zip(*blocks)
    )
    if not valid.any():
        raise ValueError(
            "No query has a true match in the gallery (after dropping same-camera images of the "
            "same person and junk images): the metrics are undefined. Check the ids and cameras."
        )
    results = {f"rank{k}": float(np.mean(first[valid] <= k)) for k in ranks}
    results["mAP"] = float(np.mean(average_precision[valid]))
    results["mINP"] = float(np.mean(inverse_negative_penalty[valid]))
    results["num_valid_queries"] = int(valid.sum())
    results["num_skipped_queries"] = int(num_queries - valid.sum())
    results["num_queries"] = int(num_queries)
    return results


# What evaluation.json says of each protocol.
PROTOCOLS = {
    "market1501": "Market-1501: queries against the gallery; gallery images of the query's person "
    "seen by the query's camera are dropped, junk images (id -1) too",
    "all_other_images": "no camera ids: each image is a query against all the other images, and "
    "every other image of its person is a true match",
}


def evaluate_reid_without_cameras(features, ids, metric="cosine", ranks=(1, 5, 10), **options):
    """Re-identification accuracy of one set of images without camera ids: leave-one-out.

    Each image is a query against all the other images, and every other image of its person is
    a true match (the Market-1501 protocol drops same-camera matches; with no cameras there is
    nothing to drop but the query itself). This is `evaluate_reid` with the set as query and
    gallery and a camera of its own for every image, so that "same person, same camera" is the
    query alone. A person with one image has no true match: that query is skipped.

    Args:
        features: array `(N, D)` of embeddings.
        ids: integer person ids `(N,)`.
        metric: `"cosine"` or `"euclidean"`.
        ranks: the CMC ranks to report.
        **options: `evaluate_reid`'s other arguments (`re_ranking`, `batch_size`, ...).

    Returns:
        `evaluate_reid`'s dict, with `"protocol": "all_other_images"`.

    Example:

    ```python
    results = evaluate_reid_without_cameras(embeddings, person_ids)
    print(f"rank-1 {results['rank1']:.1%}  mAP {results['mAP']:.1%}")
    ```
    """
    features = _as_features(features, "features")
    ids = _as_vector(ids, "ids", len(features))
    own_camera = np.arange(len(features))
    results = evaluate_reid(
        features, ids, own_camera, features, ids, own_camera, metric=metric, ranks=ranks, **options
    )
    return {**results, "protocol": "all_other_images"}
