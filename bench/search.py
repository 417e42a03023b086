"""Person search at scale: faiss flat, IVF and HNSW against NumPy brute force, and end to end.

Scale (`--part scale`): galleries of 10^4 to 10^6 embeddings of MobileNetV2's global descriptor
(d = 1,280) and 10^4 to 10^5 of PCB's stripes (d = 6 x 1,280 = 7,680), 100 queries, k = 10.
For each gallery, in one process on one machine:

    numpy    queries @ gallery.T, then the top 10 (argpartition): the exact answer
    flat     keras_fg.search.GalleryIndex(index_type="flat"): exact, faiss
    ivf      index_type="ivf" (nlist = 4·√N), every nprobe of NPROBES
    hnsw     index_type="hnsw" (M = 32, efConstruction = 40), every efSearch of EF_SEARCHES
    ivfpq    (d = 7,680 only) index_type="ivfpq", 96 and 192 bytes per entry; also its top 100
             re-ranked by exact inner products of the float32 vectors (on disk at 10^6)
    pca      (d = 7,680 only) a PCA to 1,280 dimensions, then an exact search

Per setting: per-query latency, median and p99 over the 100 queries searched one at a time
(twice; once at 10^6), and the per-query time of the batch of 100 (median of 3 runs), each timed in turns with
NumPy's, block by block, so that both see the same load; recall@10 against NumPy's exact top 10; per index: build time, size on disk, save and load time, resident memory and build peak.

The embeddings are synthetic, drawn to mimic real ones: two re-ID models trained by train.py
on mini-MARS (configs/reid_mini_mars.yaml, seed 0, the shared MobileNetV2: `--model gap` for the
1,280-d global descriptor, the recipe's PCB for the 7,680-d stripes; trained once into
bench/cache/) embed mini-MARS (its 2,280 images, 32 people, 256 x 128, "features" as served),
and from those embeddings come the per-dimension mean, the per-dimension spread of the people's
mean vectors around it, the per-dimension spread of a person's images around their mean, and
the number of gallery images per person. A synthetic person is a mean vector drawn from the
first two, each of their images that plus noise of the third (clipped at 0 where the real
features are non-negative), then L2-normalised; gallery sizes are filled with people of the
real image counts; each query is a fresh image of a person in the gallery. `calibration` in
each JSON compares the real and the synthetic statistics (cosine between images of one person,
of two people, and leave-one-out rank-1); a JSON calibrated from another source is measured
again.

End to end (`--part end_to_end`): `predict.py MODEL --index DIR --build` on mini-MARS's gallery
(529 images), then its 32 queries searched in the index, against the `--gallery` path (which
embeds the gallery on every call); wall time of each command, 3 runs each, median.

    python bench/search.py                 # both parts; resumes: a finished size is skipped
    python bench/search.py --part scale --sizes 10000 100000
    python bench/search.py --table         # rewrites the table in docs/search.md from the JSON

Writes bench/results/search_d<dim>_n<size>.json per gallery, search_end_to_end.json, and the
table of docs/search.md (`write_docs_table`, for bench/make_table.py).
"""

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import MARS_ROOT, MOBILENET_WEIGHTS, RESULTS, ROOT, machine_info, require_shared

sys.path.insert(0, str(ROOT))

SIZES = {1280: (10_000, 30_000, 100_000, 1_000_000), 7680: (10_000, 100_000)}
QUERIES, K = 100, 10
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128)
EF_SEARCHES = (16, 32, 64, 128, 256, 512, 1024)
PQ_BYTES = (96, 192)
RERANK, RERANK_NPROBES = 100, (16, 64)  # IVF-PQ's candidates re-ranked exactly, and its nprobes.
PCA_DIM, PCA_SAMPLE = 1280, 4000
CHUNK = 50_000  # Rows generated at a time: no float64 or full-size temporaries.
LEAN_FROM = 1_000_000  # From this size the gallery is never in memory beside an index.
RECALL_GOAL = 0.99
DOCS = ROOT / "docs" / "search.md"
TABLE_START, TABLE_END = "<!-- search-table:start -->", "<!-- search-table:end -->"
CALIBRATION_RUNS = ROOT / "bench" / "cache" / "search_calibration"
CALIBRATION_CACHE = CALIBRATION_RUNS / "statistics.npz"
# The trained models' descriptors: family -> dimension.
CALIBRATION_FAMILIES = {"gap": 1280, "pcb": 7680}
CALIBRATION_SOURCE = (
    "re-ID models trained by train.py on mini-MARS (configs/reid_mini_mars.yaml, seed 0; "
    "--model gap for d = 1,280, pcb for d = 7,680), their served features"
)


# ---------------------------------------------------------------------------------------------
# Memory.


def memory_mb(field):
    """`VmRSS` or `VmHWM` (the peak since the last `reset_peak`) of this process, in MiB."""
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def wait_for_memory(needed_mb, patience_seconds=1800):
    """Waits until the machine has `needed_mb` available (others' jobs share it); False if not.

    A gallery that does not fit would push the shared machine into the out-of-memory killer,
    which may pick another user's job: the size is skipped instead, and can be resumed.
    """
    deadline = time.monotonic() + patience_seconds
    while True:
        with open("/proc/meminfo") as file:
            info = {line.split(":")[0]: int(line.split()[1]) for line in file}
        available = info.get("MemAvailable", 0) / 1024
        if available >= needed_mb:
            return True
        if time.monotonic() > deadline:
            print(
                f"  skipped: {available:,.0f} MB available, {needed_mb:,.0f} MB needed", flush=True
            )
            return False
        print(f"  waiting for memory: {available:,.0f} MB available, {needed_mb:,.0f} MB needed")
        time.sleep(30)


def reset_peak():
    """Restarts VmHWM from the current RSS (Linux: clear_refs 5), so a phase has its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# Real statistics, synthetic embeddings.


def calibration_model(family):
    """A re-ID model trained by train.py on mini-MARS (once: the run stays in bench/cache)."""
    output = CALIBRATION_RUNS / family
    if not (output / "model.keras").exists():
        command = [
            sys.executable, "train.py", "--config", "configs/reid_mini_mars.yaml",
            "--model", family, "--seed", "0", "--data", os.path.relpath(MARS_ROOT, ROOT),
            "--weights", os.path.relpath(MOBILENET_WEIGHTS, ROOT), "--output", str(output),
            "--verbose", "2",
        ]  # fmt: skip
        print("calibration: " + " ".join(command[1:]), flush=True)
        subprocess.run(command, cwd=ROOT, check=True)
    import keras

    return keras.saving.load_model(output / "model.keras")


def calibrate():
    """Per-dimension statistics of trained models' mini-MARS embeddings (cached in bench/cache)."""
    if CALIBRATION_CACHE.exists():
        return dict(np.load(CALIBRATION_CACHE))
    require_shared(MARS_ROOT, MOBILENET_WEIGHTS)
    from keras_fg.data import ImageRecords, load_dataset
    from keras_fg.data.pipeline import make_pipeline

    splits = [load_dataset("market1501", MARS_ROOT, s) for s in ("train", "query", "gallery")]
    # Training labels are 0..15; the test people keep their ids: offset the training ones.
    ids = np.concatenate([splits[0].labels + 100_000, splits[1].labels, splits[2].labels])
    paths = splits[0].paths + splits[1].paths + splits[2].paths
    records = ImageRecords(paths, np.arange(len(paths)), ["0"])
    stats = {"gallery_counts": np.unique(splits[2].labels, return_counts=True)[1]}
    for family, dim in CALIBRATION_FAMILIES.items():
        model = calibration_model(family)
        features = np.concatenate(
            [
                np.asarray(model.predict_on_batch(images)["features"])
                for images, _ in make_pipeline(records, (256, 128), 32, training=False)
            ]
        ).astype(np.float32)
        assert features.shape[1] == dim, features.shape
        people = np.unique(ids)
        centers = np.stack([features[ids == p].mean(0) for p in people])
        residuals = features - centers[np.searchsorted(people, ids)]
        stats[f"mean_{dim}"] = features.mean(0)
        stats[f"between_std_{dim}"] = centers.std(0)
        stats[f"within_std_{dim}"] = residuals.std(0)
        stats[f"nonnegative_{dim}"] = np.array(bool((features >= 0).all()))
        stats[f"real_{dim}"] = features
    stats["real_ids"] = ids
    CALIBRATION_CACHE.parent.mkdir(parents=True, exist_ok=True)
    np.savez(CALIBRATION_CACHE, **stats)
    return stats


def _clip(stats, dim, block):
    if stats[f"nonnegative_{dim}"]:  # A ReLU network's features are never negative.
        np.maximum(block, 0, out=block)


def synthetic(stats, dim, size, seed):
    """`(gallery (size, dim), queries (QUERIES, dim), gallery_person, query_person)`, unit rows."""
    rng = np.random.default_rng(seed)
    mean, between = stats[f"mean_{dim}"], stats[f"between_std_{dim}"]
    within = stats[f"within_std_{dim}"]
    counts = rng.choice(stats["gallery_counts"], size=size // stats["gallery_counts"].min() + 1)
    counts = counts[: np.searchsorted(np.cumsum(counts), size) + 1]
    person = np.repeat(np.arange(len(counts)), counts)[:size]
    centers = mean + between * rng.standard_normal((len(counts), dim), dtype=np.float32)
    gallery = np.empty((size, dim), np.float32)
    for start in range(0, size, CHUNK):
        rows = slice(start, min(start + CHUNK, size))
        block = gallery[rows]
        block[:] = rng.standard_normal(block.shape, dtype=np.float32)
        block *= within
        block += centers[person[rows]]
        _clip(stats, dim, block)
        block /= np.sqrt(np.einsum("ij,ij->i", block, block))[:, None]
    query_person = rng.choice(person, QUERIES, replace=False)
    queries = centers[query_person] + within * rng.standard_normal((QUERIES, dim), np.float32)
    _clip(stats, dim, queries)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return gallery, queries.astype(np.float32), person, query_person


class ChunkedGallery:
    """A synthetic gallery drawn as `synthetic` draws it, chunk by chunk, never whole, its
    rows in a random order of people.

    At 10^6 x 1,280 the gallery (5 GB) and an index (5 GB) do not fit beside the other jobs of
    a shared 24 GB machine: NumPy is timed on the whole gallery first, then each index is built
    from the chunks drawn again (each chunk its own seed, so the same numbers every time).
    """

    def __init__(self, stats, dim, size, seed, first_chunk=CHUNK):
        rng = np.random.default_rng(seed)
        self.stats, self.dim, self.size, self.seed = stats, dim, size, seed
        self.first_chunk = first_chunk
        counts = stats["gallery_counts"]
        counts = rng.choice(counts, size=size // counts.min() + 1)
        counts = counts[: np.searchsorted(np.cumsum(counts), size) + 1]
        # Footage interleaves people, and the first chunk trains IVF's lists: in order of
        # person it would hold only the first people and leave the lists unbalanced.
        self.person = rng.permutation(np.repeat(np.arange(len(counts)), counts))[:size]
        between = stats[f"between_std_{dim}"]
        self.centers = stats[f"mean_{dim}"] + between * rng.standard_normal(
            (len(counts), dim), dtype=np.float32
        )
        query_rng = np.random.default_rng([seed, size])
        query_person = query_rng.choice(self.person, QUERIES, replace=False)
        queries = self.centers[query_person] + stats[f"within_std_{dim}"] * (
            query_rng.standard_normal((QUERIES, dim), np.float32)
        )
        _clip(stats, dim, queries)
        self.queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype("float32")

    def __len__(self):
        return self.size

    def chunks(self):
        """`(start, rows)` of unit vectors, the first `first_chunk` rows long, then CHUNK."""
        within = self.stats[f"within_std_{self.dim}"]
        bounds = [0] + list(range(self.first_chunk, self.size, CHUNK)) + [self.size]
        for number, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            rng = np.random.default_rng([self.seed, number])
            block = rng.standard_normal((stop - start, self.dim), dtype=np.float32)
            block *= within
            block += self.centers[self.person[start:stop]]
            _clip(self.stats, self.dim, block)
            block /= np.sqrt(np.einsum("ij,ij->i", block, block))[:, None]
            yield start, block

    def whole(self):
        gallery = np.empty((self.size, self.dim), np.float32)
        for start, block in self.chunks():
            gallery[start : start + len(block)] = block
        return gallery


def cosine_statistics(features, ids, seed=0):
    """Mean cosine within a person and between people; leave-one-out rank-1 (cosine)."""
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(x), min(len(x), 2000), replace=False)
    similarity = x[sample] @ x.T
    same = ids[sample][:, None] == ids[None]
    same[np.arange(len(sample)), sample] = False
    other = ids[sample][:, None] != ids[None]
    similarity[np.arange(len(sample)), sample] = -np.inf
    nearest = ids[np.argmax(similarity, axis=1)]
    similarity[np.arange(len(sample)), sample] = np.nan
    return {
        "cosine_same_person": float(np.nanmean(np.where(same, similarity, np.nan))),
        "cosine_other_people": float(np.nanmean(np.where(other, similarity, np.nan))),
        "leave_one_out_rank1": float(np.mean(nearest == ids[sample])),
    }


def calibration_report(stats, dim):
    real = cosine_statistics(stats[f"real_{dim}"], stats["real_ids"])
    size = len(stats["real_ids"])
    gallery, _, person, _ = synthetic(stats, dim, size, seed=1)
    return {
        "source": f"{CALIBRATION_SOURCE}, on mini-MARS: {size} images of "
        f"{len(np.unique(stats['real_ids']))} people, 256 x 128, no flip",
        "real": real,
        "synthetic_same_size": cosine_statistics(gallery, person),
        "gallery_images_per_person": stats["gallery_counts"].tolist(),
    }


# ---------------------------------------------------------------------------------------------
# Timing.


def numpy_search(gallery, queries, k=K):
    """Exact top-k by inner product, nearest first: the brute force the old path ran."""
    scores = queries @ gallery.T
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def rerank(gallery, queries, candidates):
    """The K best of each query's candidate ids by exact inner product, best first."""
    scores = np.einsum("qd,qcd->qc", queries, gallery[np.maximum(candidates, 0)])
    scores[candidates < 0] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    return np.take_along_axis(candidates, order, axis=1)


def interleaved_latencies(searches, queries, rounds=2):
    """Per-query milliseconds of several searches, timed in turns on the same queries.

    The machine is shared: timing NumPy and an index in turns puts both under the same load.
    The turns are blocks of all the queries, not single queries, so that one search's
    lingering BLAS threads (OpenBLAS spins a while after each call) do not slow the next
    search's query. For each search: the median and p99 over its `rounds` x 100 single-query
    searches, and the per-query time of the whole batch (median of 3 batches, in turns).

    Returns:
        `({name: {"median_ms", "p99_ms", "batch_per_query_ms"}}, {name: batch ids})`.
    """
    single = {name: [] for name in searches}
    for _ in range(rounds):
        for name, search in searches.items():
            for query in queries:
                started = time.perf_counter()
                search(query[None])
                single[name].append(time.perf_counter() - started)
    batch, found = {name: [] for name in searches}, {}
    for _ in range(3):
        for name, search in searches.items():
            started = time.perf_counter()
            found[name] = search(queries)
            batch[name].append((time.perf_counter() - started) / len(queries))
    timings = {
        name: {
            "median_ms": 1000 * float(np.median(single[name])),
            "p99_ms": 1000 * float(np.percentile(single[name], 99)),
            "batch_per_query_ms": 1000 * float(np.median(batch[name])),
        }
        for name in searches
    }
    return timings, found


def recall(found, exact):
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


def directory_bytes(folder):
    return sum(path.stat().st_size for path in Path(folder).iterdir() if path.is_file())


# ---------------------------------------------------------------------------------------------
# Scale.


def measure_index(gallery, queries, exact, index_type, sweep, scratch, numpy_alone=None, **options):
    """Builds one GalleryIndex, saves and loads it, and searches it at every setting of `sweep`.

    `gallery` is an array, or a `ChunkedGallery` (added chunk by chunk; NumPy's timing is then
    `numpy_alone`, measured before, as the gallery is not in memory beside the index).
    """
    from keras_fg.search import GalleryIndex

    paths = [f"synthetic/{i:07d}.jpg" for i in range(len(gallery))]
    before = memory_mb("VmRSS")
    reset_peak()
    started = time.perf_counter()
    index = GalleryIndex(index_type=index_type, **options)
    if isinstance(gallery, np.ndarray):
        index.add_embeddings(gallery, paths)
    else:
        for start, block in gallery.chunks():
            index.add_embeddings(block, paths[start : start + len(block)])
    build_seconds = time.perf_counter() - started
    resident = memory_mb("VmRSS") - before
    peak = memory_mb("VmHWM") - before
    del paths
    folder = scratch / index_type
    started = time.perf_counter()
    index.save(folder)
    save_seconds = time.perf_counter() - started
    size = directory_bytes(folder)
    entry = {
        "index_type": index_type,
        "options": {
            "nlist": index.nlist,
            "hnsw_m": index.hnsw_m if index_type == "hnsw" else None,
            "pq_bytes": index.pq_bytes,
            **{k: v for k, v in options.items() if k not in ("nprobe", "ef_search")},
        },
        "build_seconds": build_seconds,
        "save_seconds": save_seconds,
        "disk_bytes": size,
        "disk_bytes_per_entry": size / len(gallery),
        "resident_mb": resident,
        "build_peak_mb": peak,
    }
    del index
    gc.collect()
    started = time.perf_counter()
    loaded = GalleryIndex.load(folder)
    entry["load_seconds"] = time.perf_counter() - started
    shutil.rmtree(folder)
    searches = {}
    if numpy_alone is None:
        searches["numpy"] = lambda q: numpy_search(gallery, q)
    for name, value in sweep:
        options = {name: value} if name else {}
        searches[f"{name}={value}"] = lambda q, o=options, i=loaded: i.search_arrays(q, K, **o)[1]
    if index_type == "ivfpq" and isinstance(gallery, np.ndarray):
        # PQ codes choose RERANK candidates, their float32 vectors (kept on disk at 10^6)
        # re-rank them exactly.
        sweep = sweep + [(f"nprobe_rerank{RERANK}", n) for n in RERANK_NPROBES]
        for n in RERANK_NPROBES:
            searches[f"nprobe_rerank{RERANK}={n}"] = lambda q, n=n, i=loaded: rerank(
                gallery, q, i.search_arrays(q, RERANK, nprobe=n)[1]
            )
    # At 10^6 a NumPy query takes a second: one round of single queries, not two.
    rounds = 1 if len(gallery) >= 1_000_000 else 2
    timings, found = interleaved_latencies(searches, queries, rounds)
    entry["numpy_same_window"] = timings.pop("numpy") if numpy_alone is None else numpy_alone
    entry["numpy_timed_in_turns"] = numpy_alone is None
    entry["single_query_rounds"] = rounds
    entry["settings"] = [
        {"setting": name, "value": value, **timings[f"{name}={value}"]}
        | {"recall_at_10": recall(found[f"{name}={value}"], exact)}
        for name, value in sweep
    ]
    for setting in entry["settings"]:
        print(f"  {index_type} {setting}", flush=True)
    print(f"  numpy in the same window {entry['numpy_same_window']}", flush=True)
    del loaded
    gc.collect()
    return entry


def measure_pca(gallery, queries, exact, scratch):
    """PCB at 10^6 in memory: a PCA to PCA_DIM dimensions, then an exact (flat) cosine search.

    The principal directions come from PCA_SAMPLE gallery vectors by the Gram-matrix route
    (eigenvectors of the sample's S x S Gram matrix, mapped back to d dimensions): at d = 7,680
    this is minutes cheaper than the d x d covariance's eigenvectors, and PCA_DIM < PCA_SAMPLE.
    """
    import faiss

    reset_peak()
    before = memory_mb("VmRSS")
    started = time.perf_counter()
    rows = np.sort(np.random.default_rng(0).choice(len(gallery), PCA_SAMPLE, replace=False))
    mean = gallery[rows].mean(0)
    centred = gallery[rows] - mean
    values, vectors = np.linalg.eigh(centred @ centred.T)
    top = np.argsort(values)[::-1][:PCA_DIM]
    basis = (centred.T @ vectors[:, top]) / np.sqrt(values[top])  # (d, PCA_DIM), orthonormal
    basis = basis.astype(np.float32)

    def project(x):
        projected = (x - mean) @ basis
        return projected / np.linalg.norm(projected, axis=1, keepdims=True)

    index = faiss.IndexFlatIP(PCA_DIM)
    for start in range(0, len(gallery), CHUNK):
        index.add(np.ascontiguousarray(project(gallery[start : start + CHUNK])))
    build_seconds = time.perf_counter() - started
    entry = {
        "index_type": "pca_flat",
        "options": {"pca_dim": PCA_DIM, "trained_on": PCA_SAMPLE, "centred": True},
        "build_seconds": build_seconds,
        "resident_mb": memory_mb("VmRSS") - before,
        "build_peak_mb": memory_mb("VmHWM") - before,
        "disk_bytes_per_entry": 4 * PCA_DIM,
    }
    searches = {"pca": lambda q: index.search(np.ascontiguousarray(project(q)), K)[1]}
    timings, found = interleaved_latencies(
        {"numpy": lambda q: numpy_search(gallery, q), **searches}, queries
    )
    entry["numpy_same_window"] = timings["numpy"]
    entry["settings"] = [
        {"setting": None, "value": None, **timings["pca"]}
        | {"recall_at_10": recall(found["pca"], exact)}
    ]
    print(f"  pca {entry['settings'][0]}", flush=True)
    return entry


def index_plan(dim):
    """`{name: (index_type, sweep, options)}` measured at dimension `dim`, in order."""
    plan = {
        "flat": ("flat", [(None, None)], {}),
        "ivf": ("ivf", [("nprobe", n) for n in NPROBES], {}),
        "hnsw": ("hnsw", [("ef_search", e) for e in EF_SEARCHES], {}),
    }
    if dim == 7680:
        for pq_bytes in PQ_BYTES:
            plan[f"ivfpq{pq_bytes}"] = ("ivfpq", plan["ivf"][1], {"pq_bytes": pq_bytes})
        plan["pca_flat"] = ("pca_flat", None, {})
    return plan


def run_scale(dim, size, stats, scratch, wanted, force):
    """Measures the indexes `wanted` on one gallery; the JSON is rewritten after each index,
    so that a run stopped part way resumes with the indexes it has not measured."""
    import faiss

    name = f"search_d{dim}_n{size}"
    path = RESULTS / f"{name}.json"
    result = json.loads(path.read_text()) if path.exists() else None
    if result and not result["calibration"]["source"].startswith(CALIBRATION_SOURCE):
        result = None  # Drawn from other statistics: every index is measured again.
    plan = {key: value for key, value in index_plan(dim).items() if key in wanted}
    # --force measures the wanted indexes again, and keeps the others' figures.
    done = {entry["name"] for entry in result["indexes"]} if result else set()
    done -= set(plan) if force else set()
    if not set(plan) - done:
        print(f"{name}: {', '.join(plan)} measured already (--force measures them again)")
        return
    print(f"d={dim} N={size}", flush=True)
    lean = size >= LEAN_FROM
    gallery_mb = size * dim * 4 / 2**20
    # The gallery, an index of the same size (or, in chunks, only one of them), and records.
    if not wait_for_memory(gallery_mb * (1 if lean else 2) + size * 1e-3 + 1500):
        return
    started = time.perf_counter()
    if lean:
        chunked = ChunkedGallery(stats, dim, size, seed=size + dim, first_chunk=160_000)
        queries = chunked.queries
        # NumPy is timed again with --force, so that the indexes measured now see its window.
        gallery = chunked.whole() if result is None or force else None
    else:
        gallery, queries, _, _ = synthetic(stats, dim, size, seed=size + dim)
    generate_seconds = time.perf_counter() - started
    if lean and gallery is not None and result is not None:
        timings, _ = interleaved_latencies(
            {"numpy": lambda q, g=gallery: numpy_search(g, q)}, queries, rounds=1
        )
        result["numpy_alone"] = timings["numpy"]
        print(f"  numpy alone {timings['numpy']}", flush=True)
    if result is None:
        numpy_alone = None
        if lean:  # NumPy alone now; the indexes are built from chunks once it is gone.
            timings, found = interleaved_latencies(
                {"numpy": lambda q, g=gallery: numpy_search(g, q)}, queries, rounds=1
            )
            numpy_alone, exact = timings["numpy"], found["numpy"]
            print(f"  numpy alone {numpy_alone}", flush=True)
        else:
            exact = numpy_search(gallery, queries)
        result = {
            "numpy_alone": numpy_alone,
            "gallery_in_chunks": lean,
            "dim": dim,
            "gallery_size": size,
            "queries": QUERIES,
            "k": K,
            "faiss": faiss.__version__,
            "faiss_threads": faiss.omp_get_max_threads(),
            "generate_seconds": generate_seconds,
            "gallery_mb": gallery.nbytes / 2**20,
            "embeddings": "synthetic, drawn from mini-MARS statistics (see calibration)",
            "calibration": calibration_report(stats, dim),
            "exact_top10": exact.tolist(),
            "indexes": [],
        }
    exact = np.array(result["exact_top10"])
    if lean:
        del gallery
        gc.collect()
        gallery = chunked
        write(name, result)
    else:
        assert np.array_equal(numpy_search(gallery, queries[:5]), exact[:5]), "another gallery"
    for key, (index_type, sweep, options) in plan.items():
        if key in done:
            continue
        if index_type == "pca_flat":
            entry = measure_pca(gallery, queries, exact, scratch)
        else:
            if lean and index_type in ("ivf", "ivfpq"):
                options = {**options, "nlist": round(4 * np.sqrt(size))}
            entry = measure_index(
                gallery,
                queries,
                exact,
                index_type,
                sweep,
                scratch,
                numpy_alone=result.get("numpy_alone"),
                **options,
            )
        result["indexes"] = [e for e in result["indexes"] if e["name"] != key]
        result["indexes"].append({"name": key, "load_average_after": os.getloadavg(), **entry})
        result["summary"] = summarise(result)
        result["missing"] = [
            k for k in index_plan(dim) if k not in {e["name"] for e in result["indexes"]}
        ]
        write(name, result)
    del gallery
    gc.collect()


def summarise(result):
    """Per index, the fastest setting at recall@10 >= RECALL_GOAL, and its speed-up on NumPy."""
    summary = {}
    for entry in result["indexes"]:
        numpy_ms = entry["numpy_same_window"]["median_ms"]
        numpy_batch = entry["numpy_same_window"]["batch_per_query_ms"]
        good = [s for s in entry["settings"] if s["recall_at_10"] >= RECALL_GOAL]
        best = min(good, key=lambda s: s["median_ms"]) if good else None
        if best is None:  # Report the most accurate one, and say it misses the goal.
            best = max(entry["settings"], key=lambda s: s["recall_at_10"])
        summary[entry["name"]] = {
            "setting": best["setting"],
            "value": best["value"],
            "recall_at_10": best["recall_at_10"],
            "meets_recall_goal": best["recall_at_10"] >= RECALL_GOAL,
            "median_ms": best["median_ms"],
            "p99_ms": best["p99_ms"],
            "batch_per_query_ms": best["batch_per_query_ms"],
            "speedup_vs_numpy_single": numpy_ms / best["median_ms"],
            "speedup_vs_numpy_batch": numpy_batch / best["batch_per_query_ms"],
            "numpy_median_ms": numpy_ms,
            "numpy_batch_per_query_ms": numpy_batch,
            "build_seconds": entry["build_seconds"],
            "disk_bytes_per_entry": entry["disk_bytes_per_entry"],
            "resident_mb": entry["resident_mb"],
        }
    return summary


# ---------------------------------------------------------------------------------------------
# End to end.


def run_end_to_end(scratch, repeats=3):
    """predict.py --build then --index queries, against --gallery, on mini-MARS (wall time)."""
    require_shared(MARS_ROOT, MOBILENET_WEIGHTS)
    import keras

    from keras_fg.models import create_model

    keras.utils.set_random_seed(0)
    model_path = scratch / "reid_gap.keras"
    create_model(
        "gap",
        16,
        backbone="mobilenetv2",
        weights=str(MOBILENET_WEIGHTS),
        image_size=(256, 128),
        bnneck=True,
    ).save(model_path)
    gallery, queries = MARS_ROOT / "bounding_box_test", MARS_ROOT / "query"
    one_query = sorted(queries.iterdir())[0]
    index = scratch / "mini_mars_index"
    base = [sys.executable, str(ROOT / "predict.py"), str(model_path)]
    commands = {
        "build": base + ["--index", str(index), "--build", str(gallery), "--json"],
        "index_32_queries": base + [str(queries), "--index", str(index), "--json"],
        "index_1_query": base + [str(one_query), "--index", str(index), "--json"],
        "gallery_32_queries": base + [str(queries), "--gallery", str(gallery), "--json"],
        "gallery_1_query": base + [str(one_query), "--gallery", str(gallery), "--json"],
    }
    results = {}
    for name, command in commands.items():
        runs = []
        for _ in range(repeats):
            if name == "build":
                shutil.rmtree(index, ignore_errors=True)
            started = time.perf_counter()
            completed = subprocess.run(
                command, capture_output=True, text=True, cwd=ROOT, env=_environment()
            )
            wall = time.perf_counter() - started
            if completed.returncode != 0:
                raise SystemExit(f"{name} failed: {completed.stderr.strip().splitlines()[-1]}")
            output = json.loads(completed.stdout)
            runs.append({"wall_seconds": wall, "timings": output["timings"]})
            if name.endswith("queries"):
                results.setdefault("rank1", {})[name] = output["rank1"]
        results[name] = {
            "wall_seconds_median": statistics.median(run["wall_seconds"] for run in runs),
            "in_process_median": {
                key: statistics.median(run["timings"][key] for run in runs)
                for key in runs[0]["timings"]
            },
            "runs": runs,
        }
        print(f"  {name:<20} {results[name]['wall_seconds_median']:.2f} s", flush=True)
    return {
        "model": "create_model('gap', backbone='mobilenetv2', ../shared weights, BNNeck, "
        "256 x 128), saved as .keras; untrained head",
        "gallery": "mini_mars/bounding_box_test (529 images)",
        "queries": "mini_mars/query (32 images), and its first image alone",
        "repeats": repeats,
        "note": "wall time of the whole predict.py process (Python, TensorFlow and the model "
        "loaded each time); in_process_median splits it",
        **results,
    }


def _environment():
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return environment


# ---------------------------------------------------------------------------------------------
# The table of docs/search.md.


def markdown_table():
    """The scale and end-to-end results as markdown, from bench/results/search*.json."""
    lines = [
        "| d | gallery | index (setting) | recall@10 | median ms | p99 ms | ms/query, batch "
        "of 100 | NumPy median ms / batch ms | speed-up on NumPy, 1 query / batch | build s "
        "| bytes/entry |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    machine, untrained = None, False
    for path in sorted(RESULTS.glob("search_d*_n*.json"), key=_size_key):
        result = json.loads(path.read_text())
        machine = machine or result["machine"]
        size = f"{result['gallery_size']:,}"
        if not result["calibration"]["source"].startswith(CALIBRATION_SOURCE):
            size += " (untrained)"  # Left from an earlier calibration, till measured again.
            untrained = True
        for name, best in result["summary"].items():
            setting = f" ({best['setting']}={best['value']})" if best["setting"] else ""
            mark = "" if best["meets_recall_goal"] else " (< 0.99)"
            lines.append(
                f"| {result['dim']:,} | {size} | {name}{setting} | "
                f"{best['recall_at_10']:.3f}{mark} | {best['median_ms']:.2f} | "
                f"{best['p99_ms']:.2f} | {best['batch_per_query_ms']:.3f} | "
                f"{best['numpy_median_ms']:.2f} / {best['numpy_batch_per_query_ms']:.3f} | "
                f"{best['speedup_vs_numpy_single']:.1f}x / {best['speedup_vs_numpy_batch']:.1f}x "
                f"| {best['build_seconds']:.1f} | {best['disk_bytes_per_entry']:,.0f} |"
            )
        for name in result.get("missing", []):
            lines.append(f"| {result['dim']:,} | {size} | {name}: not measured | | | | | | | | |")
    if machine:
        loads = [
            index["load_average_after"][0]
            for path in RESULTS.glob("search_d*_n*.json")
            for index in json.loads(path.read_text())["indexes"]
        ]
        lines.append("")
        lines.append(
            f"Measured by `python bench/search.py` on {machine['processor']}, "
            f"{machine['cpu_count']} cores (1-minute load average {min(loads):.1f}-"
            f"{max(loads):.1f} after each index"
            + (
                ": shared with other jobs, absolute times are several times an idle "
                "machine's; compare within a row"
                if max(loads) > 1.5 * machine["cpu_count"]
                else ", the benchmark's own threads"
            )
            + "); the flat index scored by "
            "NumPy's BLAS on faiss' storage, the approximate ones on faiss threads = cores "
            "(one for fewer than 20 queries). Each row the fastest setting reaching recall@10 "
            ">= 0.99 against NumPy's exact top 10 (else the most accurate), NumPy timed in turns "
            "with it, block by block (at 10^6, before it: the two do not fit in memory "
            "together). bytes/entry: the index file over its entries (IVF's centroids "
            "included). Synthetic embeddings drawn from the statistics of the embeddings of "
            "mini-MARS by re-ID models trained with train.py (the JSON's `calibration`)."
            + (
                " Galleries marked (untrained): drawn from a pretrained MobileNetV2 with "
                "untrained heads, an earlier calibration; `python bench/search.py` measures "
                "them again."
                if untrained
                else ""
            )
        )
    end_to_end = RESULTS / "search_end_to_end.json"
    if end_to_end.exists():
        result = json.loads(end_to_end.read_text())
        lines += [
            "",
            "| predict.py on mini-MARS (529 gallery images), median of 3 | wall s | model "
            "load s | gallery embedding s | query embedding s | search s |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        labels = {
            "build": "`--index DIR --build GALLERY` (once)",
            "index_32_queries": "`QUERIES --index DIR` (32 queries)",
            "gallery_32_queries": "`QUERIES --gallery GALLERY` (32 queries)",
            "index_1_query": "`QUERY --index DIR` (1 query)",
            "gallery_1_query": "`QUERY --gallery GALLERY` (1 query)",
        }

        def cell(run, key, digits):
            value = run["in_process_median"].get(key)
            return "" if value is None else f"{value:.{digits}f}"

        for key, label in labels.items():
            run = result[key]
            lines.append(
                f"| {label} | {run['wall_seconds_median']:.1f} | "
                f"{cell(run, 'load_model_seconds', 1)} | {cell(run, 'build_seconds', 1)} | "
                f"{cell(run, 'embed_queries_seconds', 1)} | {cell(run, 'search_seconds', 4)} |"
            )
        lines.append("")
        lines.append(
            f"rank-1 of the 32 queries: {result['rank1']['index_32_queries']:.3f} from the index, "
            f"{result['rank1']['gallery_32_queries']:.3f} with --gallery. 1-minute load average "
            f"{result['machine']['load_average_1_5_15'][0]:.0f} on the 2 cores: the wall times "
            "are mostly Python and TensorFlow starting."
        )
    return "\n".join(lines)


def _size_key(path):
    result = json.loads(path.read_text())
    return result["dim"], result["gallery_size"]


def write_docs_table():
    """Replaces the text between the table markers of docs/search.md; returns the table."""
    table = markdown_table()
    text = DOCS.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise SystemExit(f"{DOCS} has no {TABLE_START} / {TABLE_END} markers")
    head, rest = text.split(TABLE_START, 1)
    tail = rest.split(TABLE_END, 1)[1]
    DOCS.write_text(f"{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}")
    print(f"wrote {DOCS.relative_to(ROOT)}")
    return table


def write(name, payload):
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    temporary = path.with_suffix(".json.tmp")
    # A JSON measured again (--force) keeps its figures but gets this run's machine and load.
    payload = {k: v for k, v in payload.items() if k != "machine"}
    temporary.write_text(json.dumps({"machine": machine_info(), **payload}, indent=2) + "\n")
    temporary.replace(path)
    print(f"wrote {path.relative_to(ROOT)}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("scale", "end_to_end", "all"), default="all")
    parser.add_argument("--dims", type=int, nargs="+", default=sorted(SIZES))
    parser.add_argument("--sizes", type=int, nargs="+", help="gallery sizes (default: SIZES)")
    parser.add_argument(
        "--indexes",
        nargs="+",
        help="measure only these (flat ivf hnsw ivfpq96 ivfpq192 pca_flat; default: all)",
    )
    parser.add_argument(
        "--force", action="store_true", help="measure the --indexes of finished sizes again"
    )
    parser.add_argument("--table", action="store_true", help="only rewrite docs/search.md")
    args = parser.parse_args()
    if args.table:
        write_docs_table()
        return
    with tempfile.TemporaryDirectory(prefix="keras_fg_search_") as scratch:
        scratch = Path(scratch)
        if args.part in ("scale", "all"):
            stats = calibrate()
            for dim in args.dims:
                for size in args.sizes or SIZES[dim]:
                    wanted = args.indexes or list(index_plan(dim))
                    run_scale(dim, size, stats, scratch, wanted, args.force)
        if args.part in ("end_to_end", "all"):
            write("search_end_to_end", run_end_to_end(scratch))
    if DOCS.exists():
        write_docs_table()


if __name__ == "__main__":
    main()
