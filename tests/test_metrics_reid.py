import numpy as np
import pytest

from keras_fg.metrics import evaluate_reid, k_reciprocal_re_ranking, pairwise_distances


def brute_force_distance(a, b, metric):
    if metric == "cosine":
        return 1.0 - float(np.dot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.linalg.norm(a - b))


def brute_force_market1501(
    distances, query_ids, query_cameras, gallery_ids, gallery_cameras, ranks
):
    """The Market-1501 protocol written out query by query."""
    first_match, average_precisions, inverse_negative_penalties = [], [], []
    skipped = 0
    for q in range(len(query_ids)):
        ranked = [
            g
            for g in np.argsort(distances[q], kind="stable")
            if gallery_ids[g] != -1
            and not (gallery_ids[g] == query_ids[q] and gallery_cameras[g] == query_cameras[q])
        ]
        match_ranks = [
            position + 1 for position, g in enumerate(ranked) if gallery_ids[g] == query_ids[q]
        ]
        if not match_ranks:
            skipped += 1
            continue
        first_match.append(match_ranks[0])
        average_precisions.append(np.mean([(j + 1) / r for j, r in enumerate(match_ranks)]))
        inverse_negative_penalties.append(len(match_ranks) / match_ranks[-1])
    results = {f"rank{k}": np.mean([r <= k for r in first_match]) for k in ranks}
    results.update(mAP=np.mean(average_precisions), mINP=np.mean(inverse_negative_penalties))
    results.update(num_valid_queries=len(first_match), num_skipped_queries=skipped)
    return results


def planted_reid_data(rng, num_ids=12, queries_per_id=2, gallery_per_id=6, dim=16, noise=2.0):
    """Identities as random centres; every image is its centre plus noise, from cameras 0..3.

    Besides the planted matches it adds the cases the protocol must handle: for every query a
    same-id same-camera gallery image that is its nearest neighbour (must be ignored), junk
    images (id -1) near some queries, and one query whose identity has no gallery image.
    """
    centres = rng.normal(size=(num_ids + 1, dim)) * 2.0
    query_ids = np.repeat(np.arange(num_ids + 1), queries_per_id)
    gallery_ids = np.repeat(np.arange(num_ids), gallery_per_id)
    query_features = centres[query_ids] + noise * rng.normal(size=(len(query_ids), dim))
    gallery_features = centres[gallery_ids] + noise * rng.normal(size=(len(gallery_ids), dim))
    query_cameras = rng.integers(0, 4, len(query_ids))
    gallery_cameras = rng.integers(0, 4, len(gallery_ids))

    has_gallery = query_ids < num_ids
    same_camera_twins = query_features[has_gallery] + 1e-3 * rng.normal(
        size=(has_gallery.sum(), dim)
    )
    junk = query_features[::3] + 0.05 * rng.normal(size=(len(query_features[::3]), dim))
    gallery_features = np.concatenate([gallery_features, same_camera_twins, junk])
    gallery_ids = np.concatenate([gallery_ids, query_ids[has_gallery], -np.ones(len(junk), int)])
    gallery_cameras = np.concatenate(
        [gallery_cameras, query_cameras[has_gallery], rng.integers(0, 4, len(junk))]
    )
    return query_features, query_ids, query_cameras, gallery_features, gallery_ids, gallery_cameras


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_matches_brute_force_market1501(metric):
    data = planted_reid_data(np.random.default_rng(1))
    query_features, query_ids, query_cameras, gallery_features, gallery_ids, gallery_cameras = data
    distances = np.array(
        [[brute_force_distance(q, g, metric) for g in gallery_features] for q in query_features]
    )
    expected = brute_force_market1501(
        distances, query_ids, query_cameras, gallery_ids, gallery_cameras, (1, 5, 10)
    )

    results = evaluate_reid(*data, metric=metric)
    for key, value in expected.items():
        np.testing.assert_allclose(results[key], value, rtol=0, atol=1e-12, err_msg=key)
    assert (
        results["num_skipped_queries"] == 2
    )  # the two queries of the identity with no gallery image
    assert results["num_queries"] == len(query_ids)
    # Not a trivial problem: the twins alone would give rank-1 = 1 if they were counted.
    assert 0.3 < results["rank1"] < 1.0 and results["mAP"] < 1.0

    # Scoring the queries a few at a time changes nothing.
    assert evaluate_reid(*data, metric=metric, batch_size=3) == results


def test_pairwise_distances_match_brute_force():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 5)), rng.normal(size=(6, 5))
    for metric in ("cosine", "euclidean"):
        expected = [[brute_force_distance(a, b, metric) for b in y] for a in x]
        np.testing.assert_allclose(pairwise_distances(x, y, metric), expected, atol=1e-9)
    assert pairwise_distances(x.astype(np.float32), y.astype(np.float32)).dtype == np.float32


def test_hand_computed_single_query():
    # One query at 0 on a line, Euclidean. Sorted by distance, the gallery reads:
    #   0.5 same id, same camera -> dropped     0.7 junk (id -1) -> dropped
    #   1 other   2 match   3 other   4 match   5 other
    # Kept ranks of the matches: 2 and 4, so AP = (1/2 + 2/4) / 2 = 0.5, INP = 2/4, first at 2.
    gallery_features = np.array([[1.0], [2.0], [3.0], [4.0], [5.0], [0.5], [0.7]])
    gallery_ids = np.array([3, 7, 3, 7, 3, 7, -1])
    gallery_cameras = np.array([1, 2, 1, 1, 2, 0, 1])
    results = evaluate_reid(
        [[0.0]],
        [7],
        [0],
        gallery_features,
        gallery_ids,
        gallery_cameras,
        metric="euclidean",
        ranks=(1, 2, 3),
    )
    assert results == {
        "rank1": 0.0,
        "rank2": 1.0,
        "rank3": 1.0,
        "mAP": 0.5,
        "mINP": 0.5,
        "num_valid_queries": 1,
        "num_skipped_queries": 0,
        "num_queries": 1,
    }


def test_same_camera_image_of_the_same_person_is_ignored():
    rng = np.random.default_rng(2)
    gallery_features = rng.normal(size=(20, 8))
    gallery_ids = np.arange(20) % 5
    gallery_cameras = np.arange(20) % 3 + 1  # image 0: id 0, camera 1
    query = gallery_features[:1] + 0.01  # gallery image 0 is the nearest
    same_camera = evaluate_reid(query, [0], [1], gallery_features, gallery_ids, gallery_cameras)
    without_it = evaluate_reid(
        query, [0], [1], gallery_features[1:], gallery_ids[1:], gallery_cameras[1:]
    )
    assert same_camera == without_it
    # From another camera the same image is a true match at rank 1.
    assert (
        evaluate_reid(query, [0], [2], gallery_features, gallery_ids, gallery_cameras)["rank1"]
        == 1.0
    )


def test_queries_without_a_true_match_are_skipped_and_counted():
    gallery_features = np.eye(4)
    gallery_ids, gallery_cameras = np.array([0, 0, 1, 2]), np.array([0, 1, 0, 0])
    # Query 0 (id 0, camera 5) has two matches; query 1 (id 2, camera 0) has only a same-camera one;
    # query 2 (id 9) has none at all.
    query_features = np.array([[1.0, 0.1, 0, 0], [0, 0, 0, 1.0], [0, 1.0, 0, 0]])
    results = evaluate_reid(
        query_features, [0, 2, 9], [5, 0, 0], gallery_features, gallery_ids, gallery_cameras
    )
    assert results["num_valid_queries"] == 1 and results["num_skipped_queries"] == 2
    assert results["rank1"] == 1.0 and results["mAP"] == 1.0  # averaged over the valid query only
    with pytest.raises(ValueError, match="No query has a true match"):
        evaluate_reid(
            query_features[1:], [2, 9], [0, 0], gallery_features, gallery_ids, gallery_cameras
        )


def reference_re_ranking(original_dist, query_num, k1, k2, lambda_value):
    """The k-reciprocal re-ranking of Zhong et al., transcribed loop by loop from the authors'
    released Python code; `original_dist` holds squared distances among queries + gallery."""
    original_dist = np.transpose(original_dist / np.max(original_dist, axis=0)).astype(np.float32)
    all_num = original_dist.shape[0]
    V = np.zeros_like(original_dist)
    initial_rank = np.argsort(original_dist, axis=1, kind="stable")
    for i in range(all_num):
        forward_k_neigh_index = initial_rank[i, : k1 + 1]
        backward_k_neigh_index = initial_rank[forward_k_neigh_index, : k1 + 1]
        fi = np.where(backward_k_neigh_index == i)[0]
        k_reciprocal_index = forward_k_neigh_index[fi]
        k_reciprocal_expansion_index = k_reciprocal_index
        for candidate in k_reciprocal_index:
            half = int(np.around(k1 / 2.0))
            candidate_forward = initial_rank[candidate, : half + 1]
            candidate_backward = initial_rank[candidate_forward, : half + 1]
            fi_candidate = np.where(candidate_backward == candidate)[0]
            candidate_k_reciprocal_index = candidate_forward[fi_candidate]
            if len(
                np.intersect1d(candidate_k_reciprocal_index, k_reciprocal_index)
            ) > 2.0 / 3 * len(candidate_k_reciprocal_index):
                k_reciprocal_expansion_index = np.append(
                    k_reciprocal_expansion_index, candidate_k_reciprocal_index
                )
        k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
        weight = np.exp(-original_dist[i, k_reciprocal_expansion_index])
        V[i, k_reciprocal_expansion_index] = weight / np.sum(weight)
    original_dist = original_dist[:query_num]
    if k2 != 1:
        V_qe = np.zeros_like(V)
        for i in range(all_num):
            V_qe[i] = np.mean(V[initial_rank[i, :k2]], axis=0)
        V = V_qe
    invIndex = [np.where(V[:, i] != 0)[0] for i in range(all_num)]
    jaccard_dist = np.zeros_like(original_dist)
    for i in range(query_num):
        temp_min = np.zeros(all_num, dtype=np.float32)
        indNonZero = np.where(V[i] != 0)[0]
        for j in indNonZero:
            temp_min[invIndex[j]] += np.minimum(V[i, j], V[invIndex[j], j])
        jaccard_dist[i] = 1 - temp_min / (2.0 - temp_min)
    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    return final_dist[:query_num, query_num:]


@pytest.mark.parametrize(
    "metric, k1, k2", [("cosine", 20, 6), ("euclidean", 7, 3), ("cosine", 5, 1)]
)
def test_re_ranking_matches_the_reference_implementation(metric, k1, k2):
    rng = np.random.default_rng(3)
    query_features, gallery_features = rng.normal(size=(10, 6)), rng.normal(size=(50, 6))
    features = np.concatenate([query_features, gallery_features])
    if metric == "cosine":
        features = features / np.linalg.norm(features, axis=1, keepdims=True)
    squared = np.array([[np.sum((a - b) ** 2) for b in features] for a in features])
    expected = reference_re_ranking(squared, 10, k1, k2, 0.3)
    result = k_reciprocal_re_ranking(query_features, gallery_features, metric=metric, k1=k1, k2=k2)
    assert result.shape == (10, 50)
    np.testing.assert_allclose(result, expected, atol=2e-5)


def test_re_ranking_improves_map_on_planted_clusters():
    data = planted_reid_data(np.random.default_rng(4), num_ids=10, gallery_per_id=12, noise=1.6)
    plain = evaluate_reid(*data)
    re_ranked = evaluate_reid(*data, re_ranking=True)
    assert plain["mAP"] < 0.9  # room to improve
    assert re_ranked["mAP"] > plain["mAP"]
    assert re_ranked["num_valid_queries"] == plain["num_valid_queries"]


def test_re_ranking_refuses_large_inputs():
    features = np.zeros((6, 3))
    with pytest.raises(ValueError, match="max_re_ranking_items"):
        evaluate_reid(
            features,
            np.arange(6),
            np.zeros(6),
            features,
            np.arange(6),
            np.ones(6),
            re_ranking=True,
            max_re_ranking_items=11,
        )
    with pytest.raises(ValueError, match="k1"):
        k_reciprocal_re_ranking(features, features, k1=0)
    with pytest.raises(ValueError, match="lambda_value"):
        k_reciprocal_re_ranking(features, features, lambda_value=1.5)


def test_bad_inputs_give_clear_errors():
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(3, 4)), rng.normal(size=(5, 4))
    q_ids, q_cams, g_ids, g_cams = np.arange(3), np.zeros(3), np.arange(5), np.ones(5)
    with pytest.raises(ValueError, match="query_ids"):
        evaluate_reid(q, q_ids[:2], q_cams, g, g_ids, g_cams)
    with pytest.raises(ValueError, match="gallery_cameras"):
        evaluate_reid(q, q_ids, q_cams, g, g_ids, g_cams[:4])
    with pytest.raises(ValueError, match="query_features.*2-D"):
        evaluate_reid(q[0], q_ids, q_cams, g, g_ids, g_cams)
    with pytest.raises(ValueError, match="different dimensions"):
        evaluate_reid(q, q_ids, q_cams, g[:, :3], g_ids, g_cams)
    with pytest.raises(ValueError, match="gallery_features.*empty"):
        evaluate_reid(q, q_ids, q_cams, np.zeros((0, 4)), [], [])
    with pytest.raises(ValueError, match="metric"):
        evaluate_reid(q, q_ids, q_cams, g, g_ids, g_cams, metric="manhattan")
    with pytest.raises(ValueError, match="ranks"):
        evaluate_reid(q, q_ids, q_cams, g, g_ids, g_cams, ranks=(0, 5))
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_reid(q, q_ids, q_cams, g, g_ids, g_cams, batch_size=0)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_re_ranked_scores_match_brute_force(metric):
    # The whole re-ranked evaluation: the authors' re-ranking, then the protocol query by query.
    data = planted_reid_data(np.random.default_rng(5), num_ids=8, gallery_per_id=8, noise=1.8)
    query_features, query_ids, query_cameras, gallery_features, gallery_ids, gallery_cameras = data
    features = np.concatenate([query_features, gallery_features])
    if metric == "cosine":
        features = features / np.linalg.norm(features, axis=1, keepdims=True)
    squared = np.array([[np.sum((a - b) ** 2) for b in features] for a in features])
    distances = reference_re_ranking(squared, len(query_features), 20, 6, 0.3)
    expected = brute_force_market1501(
        distances, query_ids, query_cameras, gallery_ids, gallery_cameras, (1, 5, 10)
    )
    results = evaluate_reid(*data, metric=metric, re_ranking=True)
    for key, value in expected.items():
        np.testing.assert_allclose(results[key], value, rtol=0, atol=1e-6, err_msg=key)
    assert results != evaluate_reid(*data, metric=metric)  # The re-ranking did re-rank.
