"""`GalleryIndex`: gallery embeddings in a faiss index, saved to disk with a JSON manifest."""

import hashlib
import json
import math
import os
import uuid
from pathlib import Path

import numpy as np

from keras_fg.data.market1501 import FILE_NAME

FORMAT = "keras_fg.gallery_index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_TYPES = ("auto", "flat", "ivf", "hnsw", "ivfpq")
METRICS = ("cosine", "euclidean")
# "auto" keeps an exact flat index below this many entries and an IVF index from it on.
# bench/search.py, d = 1,280 on 2 shared cores: flat's median query took 2.3 ms at 10^4 entries
# and 12 ms at 3·10^4, where IVF took 0.6 ms at recall@10 0.996 (docs/search.md).
AUTO_FLAT_BELOW = 20_000
# IVF: the coarse quantiser's k-means runs this many iterations on at most this many points per
# list (faiss warns below 39); the rest of the gallery is only assigned to its nearest list.
IVF_TRAIN_ITERATIONS = 10
IVF_TRAIN_POINTS_PER_LIST = 40
# Query-time defaults, from bench/search.py at 10^5 x 1,280
# (bench/results/search_d1280_n100000.json): IVF scanning 5 % of its lists (64 of 1,265)
# found 0.999 of the exact top 10, 2.5 % 0.987; HNSW with 256 candidates 0.995, 128 0.978.
DEFAULT_NPROBE_FRACTION = 0.05
DEFAULT_NPROBE = "5% of the lists (at least 8)"  # What the help says.
DEFAULT_HNSW_M = 32
DEFAULT_EF_SEARCH = 256
DEFAULT_EF_CONSTRUCTION = 40
# An approximate index searches fewer queries than this on one thread: for one query a team of
# OpenMP threads costs more than it saves, most on a loaded machine (the IDMap's id translation
# forks a team too).
SMALL_BATCH = 20
# The flat index is scored in blocks of this many entries (a (queries, block) score matrix).
FLAT_BLOCK = 65_536
EXTRA = 'pip install "keras-fg[search]" (or: pip install -e ".[search]")'


class GalleryIndexError(ValueError):
    """An unusable gallery index or search input; the message is one line."""


class FaissMissingError(ImportError):
    """faiss is not installed; the message names the extra that installs it."""


def import_faiss():
    """faiss, or an ImportError of one line that names the extra to install."""
    try:
        import faiss
    except ImportError as error:
        raise FaissMissingError(
            f"keras_fg.search needs faiss, which is not installed: {EXTRA}"
        ) from error
    return faiss


def set_num_threads(count):
    """Sets the number of OpenMP threads faiss searches and builds with.

    Args:
        count: int >= 1.

    Raises:
        ValueError: `count` < 1.
    """
    if int(count) < 1:
        raise ValueError(f"The number of faiss threads must be >= 1. Received: {count}")
    import_faiss().omp_set_num_threads(int(count))


def entry_record(path, person_id=None, camera=None):
    """The record of one gallery image: its path, and its person and camera.

    Person id and camera come from arguments when given, else from a Market-1501 /
    DukeMTMC-reID file name (`0002_c1s1_000451_03.jpg`: person 2, camera 1), else `None`.

    Args:
        path: the image's path.
        person_id: optional person id (an int, or a string such as an identity folder's name).
        camera: optional camera id.

    Returns:
        A dict `{"path", "person_id", "camera"}`.
    """
    match = FILE_NAME.match(Path(path).name)
    if match is not None:
        person_id = int(match.group(1)) if person_id is None else person_id
        camera = int(match.group(2)) if camera is None else camera
    return {"path": str(path), "person_id": person_id, "camera": camera}


def _one_line(error):
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return text[:200] or type(error).__name__


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class GalleryIndex:
    """A searchable gallery of image embeddings, kept on disk between runs.

    Cosine similarity is the inner product of L2-normalised embeddings, so with
    `metric="cosine"` every vector is normalised before it enters the index and the returned
    distance is `1 - cos`, as `keras_fg.metrics.pairwise_distances` and `evaluate_reid` compute
    it; with `"euclidean"` vectors are kept as they are and the distance is `‖a - b‖`.

    Index types:

    - `"flat"`: exact; every query is compared with every entry (4·d bytes per entry).
    - `"ivf"`: the entries split into `nlist` lists by k-means (nlist ≈ 4·√N, trained on the
      first vectors added); a query scans the `nprobe` nearest lists. Approximate. The lists
      stay as first trained: rebuild an index that has grown many times over its first add.
    - `"hnsw"`: a navigable small-world graph (`M` links per entry); `ef_search` candidates
      per query. Approximate; 4·d + 8·M bytes per entry; removal rebuilds the graph.
    - `"ivfpq"`: IVF whose entries are product-quantised to `pq_bytes` bytes each: the one for
      galleries whose float32 vectors do not fit in memory. Approximate.
    - `"auto"`: flat below `AUTO_FLAT_BELOW` entries, IVF from there on (a flat index that
      grows past it is rebuilt as IVF by the `add` that crosses it).

    Entries are never re-numbered: each has an `id`, stored in the faiss index and in the
    manifest, so `remove` leaves the other entries' ids as they were.

    Args:
        dim: embedding dimension, or `None` to take it from the first vectors added.
        index_type: one of `INDEX_TYPES`. Defaults to `"auto"`.
        metric: `"cosine"` or `"euclidean"`. Defaults to `"cosine"`.
        fingerprint: the fingerprint of the model whose embeddings the index holds
            (`Predictor.fingerprint()`), or `None` (embeddings from elsewhere). Set by `build`.
        nlist: IVF lists; `None` picks 4·√N (at most N / 39) when the index is trained.
        nprobe: IVF lists scanned per query. `None` (default): 5 % of the lists, at least 8.
        hnsw_m: HNSW links per entry. Defaults to 32.
        ef_search: HNSW candidates per query. Defaults to `DEFAULT_EF_SEARCH`.
        pq_bytes: bytes per entry of `"ivfpq"` (a divisor of `dim`); `None` picks the divisor
            nearest dim / 80 (96 for 7,680: 320 times smaller than float32).

    Example:

    ```python
    index = GalleryIndex.build("reid.keras", gallery_paths)
    index.save("gallery_index")
    index = GalleryIndex.load("gallery_index", "reid.keras")
    for hit in index.search(["query.jpg"], k=5)[0]:
        print(hit["rank"], hit["distance"], hit["path"], hit["person_id"])
    ```
    """

    def __init__(
        self,
        dim=None,
        index_type="auto",
        metric="cosine",
        fingerprint=None,
        nlist=None,
        nprobe=None,
        hnsw_m=DEFAULT_HNSW_M,
        ef_search=DEFAULT_EF_SEARCH,
        pq_bytes=None,
    ):
        if index_type not in INDEX_TYPES:
            raise GalleryIndexError(
                f"`index_type` must be one of {INDEX_TYPES}. Received: index_type={index_type!r}"
            )
        if metric not in METRICS:
            raise GalleryIndexError(f"`metric` must be one of {METRICS}. Received: {metric!r}")
        for name, value in (("dim", dim), ("nlist", nlist), ("pq_bytes", pq_bytes)):
            if value is not None and int(value) < 1:
                raise GalleryIndexError(f"`{name}` must be >= 1. Received: {name}={value}")
        for name, value in (("nprobe", nprobe), ("hnsw_m", hnsw_m), ("ef_search", ef_search)):
            if value is not None and int(value) < 1:
                raise GalleryIndexError(f"`{name}` must be >= 1. Received: {name}={value}")
        self.dim = None if dim is None else int(dim)
        self.index_type = index_type
        self.metric = metric
        self.fingerprint = fingerprint
        self.nlist = None if nlist is None else int(nlist)
        self.nprobe = None if nprobe is None else int(nprobe)
        self.hnsw_m = int(hnsw_m)
        self.ef_search = int(ef_search)
        self.pq_bytes = None if pq_bytes is None else int(pq_bytes)
        self.predictor = None  # The model of `build` / `load`, used by `add` and `search`.
        self._faiss = import_faiss()
        self._index = None
        self._kind = None  # The faiss structure in use: "flat", "ivf", "hnsw" or "ivfpq".
        self._flat_cache = None  # The flat index's ids and squared norms, between searches.
        self._records = {}  # id -> {"id", "path", "person_id", "camera"}, in order of addition.
        self._ids_of_path = {}
        self._next_id = 0

    # === Building ===

    @classmethod
    def build(cls, model_or_predictor, image_paths, batch_size=32, progress=None, **options):
        """Embeds images with a model and indexes them.

        Args:
            model_or_predictor: a `.keras` file, SavedModel directory or `.tflite` file (path),
                a `keras.Model`, or a `keras_fg.inference.Predictor`.
            image_paths: the gallery's image files.
            batch_size: images per model call.
            progress: optional progress bar (see `keras_fg.inference.predict_files`).
            **options: the constructor's arguments (`index_type`, `metric`, ...), and `add`'s
                `person_ids`.

        Returns:
            The `GalleryIndex`; its `skipped` lists the unreadable files.

        Raises:
            PredictInputError: the model does not load, or no image could be read.
        """
        from keras_fg.inference import as_predictor

        predictor = as_predictor(model_or_predictor)
        person_ids = options.pop("person_ids", None)
        index = cls(fingerprint=predictor.fingerprint(), **options)
        index.predictor = predictor
        index.skipped = index.add(
            image_paths, batch_size=batch_size, progress=progress, person_ids=person_ids
        )
        return index

    def add(
        self, image_paths, model_or_predictor=None, batch_size=32, progress=None, person_ids=None
    ):
        """Embeds more images and appends them; files already in the index are left out.

        Args:
            image_paths: image files.
            model_or_predictor: the model, when the index was not built or loaded with one.
            batch_size: images per model call.
            progress: optional progress bar.
            person_ids: optional person id of each image (e.g. its identity folder's name),
                for files whose names do not follow Market-1501.

        Returns:
            `[{"image", "reason"}]` for the files not added (unreadable, or already indexed).

        Raises:
            GalleryIndexError: the model is not the one the index was built with.
        """
        from keras_fg.inference import predict_files

        predictor = self._predictor_for(model_or_predictor)
        paths = [Path(path) for path in image_paths]
        if person_ids is not None and len(person_ids) != len(paths):
            raise GalleryIndexError(
                f"One person id per image is needed. Received: {len(paths)} images and "
                f"{len(person_ids)} person ids"
            )
        person_of = dict(zip(map(str, paths), person_ids if person_ids is not None else []))
        present = [{"image": str(p), "reason": "already in the index"} for p in paths]
        present = [entry for entry in present if entry["image"] in self._ids_of_path]
        paths = [path for path in paths if str(path) not in self._ids_of_path]
        if not paths:
            return present
        if self.fingerprint is None:
            self.fingerprint = predictor.fingerprint()
        kept, outputs, skipped = predict_files(predictor, paths, batch_size, "gallery", progress)
        records = [entry_record(path, person_of.get(str(path))) for path in kept]
        self.add_embeddings(outputs["features"], records)
        return present + skipped

    def add_embeddings(self, vectors, records):
        """Appends embeddings computed elsewhere.

        Args:
            vectors: array `(N, dim)`.
            records: `N` image paths, or dicts with `"path"` and optionally `"person_id"` and
                `"camera"` (see `entry_record`). Paths must be new to the index.

        Returns:
            The ids given to the new entries, an int64 array `(N,)`.

        Raises:
            GalleryIndexError: a dimension, count or path that does not fit.
        """
        vectors = self._prepare(vectors, "vectors")
        if len(records) != len(vectors):
            raise GalleryIndexError(
                f"One record per vector is needed. Received: {len(vectors)} vectors and "
                f"{len(records)} records"
            )
        records = [entry_record(**r) if isinstance(r, dict) else entry_record(r) for r in records]
        paths = [record["path"] for record in records]
        repeated = next((p for p in paths if p in self._ids_of_path), None)
        if repeated is None and len(set(paths)) < len(paths):
            repeated = next(p for p in paths if paths.count(p) > 1)
        if repeated is not None:
            raise GalleryIndexError(f"Path given twice to the index: {repeated}")
        ids = np.arange(self._next_id, self._next_id + len(vectors), dtype=np.int64)
        if self._index is None:
            self._create(vectors)
        elif self.index_type == "auto" and self._kind == "flat":
            if len(self) + len(vectors) >= AUTO_FLAT_BELOW:
                stored_ids, stored = self._stored_vectors()
                self._index = None
                self._create(np.concatenate([stored, vectors]))
                self._index.add_with_ids(stored, stored_ids)
        self._index.add_with_ids(vectors, ids)
        self._flat_cache = None
        for entry_id, record in zip(ids.tolist(), records):
            self._records[entry_id] = {"id": entry_id, **record}
            self._ids_of_path[record["path"]] = entry_id
        self._next_id += len(vectors)
        return ids

    def remove(self, paths):
        """Removes the entries of `paths` (a person's images, a camera taken offline).

        Nothing is removed when one path is not in the index. Call `save` to persist it.

        Args:
            paths: image paths, as they were added.

        Returns:
            The number of entries removed.

        Raises:
            GalleryIndexError: a path that is not in the index.
        """
        paths = [str(path) for path in paths]
        missing = [path for path in paths if path not in self._ids_of_path]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise GalleryIndexError(f"Not in the index: {missing[0]}{more}")
        ids = np.array(sorted({self._ids_of_path[path] for path in paths}), dtype=np.int64)
        if len(ids) == 0:
            return 0
        if self._kind == "hnsw":  # A graph cannot drop nodes: rebuilt from the vectors kept.
            stored_ids, stored = self._stored_vectors()
            keep = ~np.isin(stored_ids, ids)
            self._index = self._new_index("hnsw", self.dim)
            self._index.add_with_ids(stored[keep], stored_ids[keep])
        else:
            removed = self._index.remove_ids(self._faiss.IDSelectorBatch(ids))
            if removed != len(ids):
                raise GalleryIndexError(
                    f"faiss removed {removed} entries instead of {len(ids)}: the index and its "
                    "records disagree"
                )
        self._flat_cache = None
        for entry_id in ids.tolist():
            del self._ids_of_path[self._records.pop(entry_id)["path"]]
        return len(ids)

    # === Searching ===

    def search(self, queries, k=10, model_or_predictor=None, nprobe=None, ef_search=None):
        """The `k` nearest gallery entries of each query, nearest first.

        Args:
            queries: embeddings `(Q, dim)`, or image paths (embedded with the index's model).
            k: entries returned per query (fewer when the gallery is smaller).
            model_or_predictor: the model for image queries, when the index has none yet.
            nprobe: IVF lists scanned, for this call (default: the index's `nprobe`).
            ef_search: HNSW candidates, for this call (default: the index's `ef_search`).

        The flat index is scored by NumPy's BLAS on faiss' storage; the approximate ones
        search fewer than `SMALL_BATCH` queries on one faiss thread (faiss' thread count is
        global: do not search from several Python threads at once).

        Returns:
            One list per query of dicts `{"rank", "id", "distance", "path", "person_id",
            "camera"}` (person and camera `None` when unknown).

        Raises:
            GalleryIndexError: an empty index, a dimension that differs, a model that is not the
                index's, or an unreadable query image.
        """
        distances, ids = self.search_arrays(queries, k, model_or_predictor, nprobe, ef_search)
        results = []
        for row_distances, row_ids in zip(distances, ids):
            hits = []
            for distance, entry_id in zip(row_distances.tolist(), row_ids.tolist()):
                if entry_id < 0:  # faiss pads with -1 when fewer than k entries were found.
                    continue
                record = self._records[entry_id]
                hits.append({"rank": len(hits) + 1, **record, "distance": distance})
            results.append(hits)
        return results

    def search_arrays(self, queries, k=10, model_or_predictor=None, nprobe=None, ef_search=None):
        """As `search`, as arrays: `(distances, ids)`, each `(Q, k)`; missing hits have id -1."""
        if self._index is None or len(self) == 0:
            raise GalleryIndexError("The gallery index is empty: add images before searching")
        if int(k) < 1:
            raise GalleryIndexError(f"`k` must be >= 1. Received: k={k}")
        if _are_paths(queries):
            queries = self._embed_queries(queries, model_or_predictor)
        queries = self._prepare(queries, "queries")
        k = min(int(k), len(self))
        if self._kind == "flat":
            scores, ids = self._flat_search(queries, k)
        else:
            scores, ids = self._faiss_search(queries, k, nprobe, ef_search)
        if self.metric == "cosine":
            distances = 1.0 - scores
        else:  # Squared L2 distances, as faiss returns them.
            distances = np.sqrt(np.maximum(scores, 0.0))
        return np.where(ids < 0, np.inf, distances).astype(np.float32), ids

    def _faiss_search(self, queries, k, nprobe, ef_search):
        self._set_query_options(nprobe, ef_search)
        threads = self._faiss.omp_get_max_threads()
        if len(queries) < SMALL_BATCH and threads > 1:
            self._faiss.omp_set_num_threads(1)
        try:
            return self._index.search(queries, k)
        finally:
            self._faiss.omp_set_num_threads(threads)

    def _flat_search(self, queries, k):
        """Exact search of the flat index: one BLAS product per block of its own storage.

        The vectors are read in place (no copy) from the faiss index. faiss scans fewer than
        20 queries without BLAS, one query per thread; NumPy's product spreads even a single
        query over every core, so the flat index answers as fast as brute force in NumPy.
        Returns what faiss would: `(scores, ids)`, scores the inner products (cosine) or the
        squared L2 distances (euclidean), best first; ties in order of addition.
        """
        faiss = self._faiss
        inner = faiss.downcast_index(self._index.index)
        count = inner.ntotal
        stored = faiss.rev_swig_ptr(inner.get_xb(), count * self.dim).reshape(count, self.dim)
        if self._flat_cache is None:  # Ids and squared norms change only with add and remove.
            norms = None
            if self.metric == "euclidean":
                norms = np.concatenate(
                    [
                        np.einsum(
                            "ij,ij->i", stored[i : i + FLAT_BLOCK], stored[i : i + FLAT_BLOCK]
                        )
                        for i in range(0, count, FLAT_BLOCK)
                    ]
                )
            self._flat_cache = (faiss.vector_to_array(self._index.id_map), norms)
        entry_ids, norms = self._flat_cache
        best = np.empty((len(queries), 0), np.float32)  # Higher is nearer.
        where = np.empty((len(queries), 0), np.int64)
        for start in range(0, count, FLAT_BLOCK):
            scores = queries @ stored[start : start + FLAT_BLOCK].T
            if norms is not None:  # -‖q - g‖² + ‖q‖²: the ranking of the L2 distance.
                scores = 2 * scores - norms[start : start + FLAT_BLOCK]
            if scores.shape[1] > k:
                top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
                scores = np.take_along_axis(scores, top, axis=1)
            else:
                top = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
            best = np.concatenate([best, scores], axis=1)
            where = np.concatenate([where, top + start], axis=1)
            if best.shape[1] > k:
                keep = np.argpartition(-best, k - 1, axis=1)[:, :k]
                best = np.take_along_axis(best, keep, axis=1)
                where = np.take_along_axis(where, keep, axis=1)
        # Nearest first; equal scores in order of addition.
        order = np.lexsort((where, -best), axis=1)
        best, where = np.take_along_axis(best, order, 1), np.take_along_axis(where, order, 1)
        if norms is not None:
            best = np.einsum("ij,ij->i", queries, queries)[:, None] - best
        return best, entry_ids[where]

    # === Persistence ===

    def save(self, directory):
        """Writes the index into `directory`: a faiss file and `manifest.json`.

        The manifest is the commit point: the new faiss file is written and flushed under a
        new name first, then the manifest naming it replaces the old one in one `os.replace`,
        and only then is the old file deleted. A save killed at any moment leaves the
        previous index loadable, and answering as before.

        Args:
            directory: the index's folder (created when missing).

        Returns:
            The manifest, as a dict.
        """
        if self._index is None:
            raise GalleryIndexError("The gallery index is empty: there is nothing to save")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        index_file = f"index-{uuid.uuid4().hex[:12]}.faiss"
        temporary = directory / f".{index_file}.tmp"
        self._faiss.write_index(self._index, str(temporary))
        _fsync(temporary)
        os.replace(temporary, directory / index_file)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dim": self.dim,
            "metric": self.metric,
            "index_type": self.index_type,
            "structure": self._kind,
            "options": {
                "nlist": self.nlist,
                "nprobe": self.nprobe,
                "hnsw_m": self.hnsw_m,
                "ef_search": self.ef_search,
                "pq_bytes": self.pq_bytes,
            },
            "fingerprint": self.fingerprint,
            "index_file": index_file,
            "index_bytes": (directory / index_file).stat().st_size,
            "index_sha256": _sha256(directory / index_file),
            "count": len(self),
            "next_id": self._next_id,
            "records": list(self._records.values()),
        }
        temporary = directory / f".{MANIFEST}.tmp"
        temporary.write_text(json.dumps(manifest) + "\n")
        _fsync(temporary)
        os.replace(temporary, directory / MANIFEST)
        _fsync_directory(directory)
        for stale in directory.glob("index-*.faiss"):  # The old file, and any a kill left.
            if stale.name != index_file:
                stale.unlink()
        for stale in directory.glob(".index-*.faiss.tmp"):
            stale.unlink()
        return manifest

    @classmethod
    def load(cls, directory, model_or_predictor=None):
        """Reads an index that `save` wrote, checking it whole before it answers.

        Args:
            directory: the index's folder.
            model_or_predictor: optional model the queries will be embedded with; it must be
                the model the index was built with (same fingerprint).

        Returns:
            The `GalleryIndex`.

        Raises:
            GalleryIndexError: one line each for a folder without a manifest, a manifest that
                is not one, a newer format, a missing / truncated / corrupt faiss file, a
                dimension or entry count that differs between manifest and faiss file, or a
                model whose fingerprint differs.
        """
        directory = Path(directory)
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            raise GalleryIndexError(f"{directory} is not a gallery index: no {MANIFEST}")
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("format") != FORMAT:
                raise ValueError(f"its format is {manifest.get('format')!r}, not {FORMAT!r}")
            version = int(manifest["format_version"])
            records, dim, index_file = manifest["records"], manifest["dim"], manifest["index_file"]
            expected_bytes, expected_sha256 = manifest["index_bytes"], manifest["index_sha256"]
            settings = dict(
                dim=dim,
                index_type=manifest["index_type"],
                metric=manifest["metric"],
                fingerprint=manifest["fingerprint"],
                **manifest["options"],
            )
            structure, next_id = manifest["structure"], int(manifest["next_id"])
            records = [(int(r["id"]), r) for r in records]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise GalleryIndexError(
                f"{manifest_path} is not a gallery index manifest: {_one_line(error)}"
            ) from error
        if version > FORMAT_VERSION:
            raise GalleryIndexError(
                f"{manifest_path} has format version {version}; this keras_fg reads up to "
                f"{FORMAT_VERSION}: upgrade keras_fg"
            )
        index_path = directory / Path(index_file).name
        if not index_path.is_file():
            raise GalleryIndexError(f"Gallery index file missing: {index_path}")
        size = index_path.stat().st_size
        if size != expected_bytes:
            raise GalleryIndexError(
                f"Gallery index file {index_path} is truncated or altered: {size} bytes, the "
                f"manifest says {expected_bytes}"
            )
        if _sha256(index_path) != expected_sha256:
            raise GalleryIndexError(
                f"Gallery index file {index_path} is corrupt: its SHA-256 differs from the "
                "manifest's"
            )
        index = cls(**settings)
        try:
            index._index = index._faiss.read_index(str(index_path))
        except RuntimeError as error:
            # faiss' message starts with the C++ function; its reason follows "Error: ".
            reason = _one_line(str(error).rsplit("Error: ", 1)[-1])
            raise GalleryIndexError(
                f"Cannot read gallery index file {index_path} (truncated, or not a faiss "
                f"index): {reason}"
            ) from error
        if index._index.d != dim:
            raise GalleryIndexError(
                f"Gallery index dimension mismatch: the manifest says {dim}, the faiss file "
                f"holds vectors of {index._index.d}"
            )
        if index._index.ntotal != len(records):
            raise GalleryIndexError(
                f"Gallery index entry count mismatch: the manifest lists {len(records)} "
                f"records, the faiss file holds {index._index.ntotal} vectors"
            )
        index._kind, index._next_id = structure, next_id
        for entry_id, record in records:
            index._records[entry_id] = record
            index._ids_of_path[record["path"]] = entry_id
        if model_or_predictor is not None:
            index._predictor_for(model_or_predictor)
        return index

    # === Introspection ===

    def __len__(self):
        return len(self._records)

    @property
    def structure(self):
        """The faiss structure in use (`"flat"`, `"ivf"`, `"hnsw"`, `"ivfpq"`), or None."""
        return self._kind

    @property
    def records(self):
        """The entries' records, in order of addition."""
        return list(self._records.values())

    def faiss_index(self):
        """The underlying faiss index (for inspection; changing it voids the manifest)."""
        return self._index

    # === Internals ===

    def _predictor_for(self, model_or_predictor):
        from keras_fg.inference import as_predictor

        if model_or_predictor is None:
            if self.predictor is None:
                raise GalleryIndexError(
                    "This gallery index has no model: pass model_or_predictor to embed images"
                )
            return self.predictor
        predictor = as_predictor(model_or_predictor)
        if self.fingerprint is not None and predictor.fingerprint() != self.fingerprint:
            raise GalleryIndexError(
                f"Model fingerprint mismatch: the index was built with {self.fingerprint[:22]}…, "
                f"the model {predictor.path} is {predictor.fingerprint()[:22]}…; rebuild the "
                "index with this model"
            )
        self.predictor = predictor
        return predictor

    def _embed_queries(self, paths, model_or_predictor):
        from keras_fg.inference import predict_files

        predictor = self._predictor_for(model_or_predictor)
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        _, outputs, skipped = predict_files(predictor, paths, 32, "query")
        if skipped:
            raise GalleryIndexError(
                f"Unreadable query image {skipped[0]['image']}: {skipped[0]['reason']}"
            )
        return outputs["features"]

    def _prepare(self, vectors, name):
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2 or len(vectors) == 0:
            raise GalleryIndexError(
                f"`{name}` must be a non-empty 2-D array (count, dim). Received shape "
                f"{vectors.shape}"
            )
        if self.dim is None:
            self.dim = vectors.shape[1]
        if vectors.shape[1] != self.dim:
            raise GalleryIndexError(
                f"Embedding dimension mismatch: the index holds {self.dim}-d vectors, the "
                f"{name} are {vectors.shape[1]}-d"
            )
        # Row by row, without (count, dim) temporaries: a 10^6 x 1,280 gallery is 5 GB.
        squared_norms = np.einsum("ij,ij->i", vectors, vectors)
        if not np.isfinite(squared_norms).all() and not np.isfinite(vectors).all():
            raise GalleryIndexError(f"`{name}` hold NaN or infinite values")
        if self.metric == "cosine" and np.abs(squared_norms - 1).max() > 1e-5:
            vectors = vectors / np.maximum(np.sqrt(squared_norms), 1e-12)[:, None]
        return np.ascontiguousarray(vectors)

    def _faiss_metric(self):
        faiss = self._faiss
        return faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2

    def _create(self, vectors):
        """Makes the faiss index for this type, trained on `vectors` when it needs training."""
        kind = self.index_type
        if kind == "auto":
            kind = "flat" if len(vectors) < AUTO_FLAT_BELOW else "ivf"
        index = self._new_index(kind, vectors.shape[1], len(vectors))
        if not index.is_trained:
            ivf = self._faiss.extract_index_ivf(index)
            sample = vectors
            limit = IVF_TRAIN_POINTS_PER_LIST * ivf.nlist
            if len(vectors) > limit:
                rows = np.sort(np.random.default_rng(0).choice(len(vectors), limit, replace=False))
                sample = vectors[rows]
            index.train(sample)
        self._index, self._kind = index, kind

    def _new_index(self, kind, dim, count=0):
        faiss = self._faiss
        metric = self._faiss_metric()
        if kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlat(dim, metric))
        if kind == "hnsw":
            graph = faiss.IndexHNSWFlat(dim, self.hnsw_m, metric)
            graph.hnsw.efConstruction = DEFAULT_EF_CONSTRUCTION
            return faiss.IndexIDMap2(graph)
        if self.nlist is None:
            self.nlist = max(1, min(round(4 * math.sqrt(count)), count // 39))
        quantizer = faiss.IndexFlat(dim, metric)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, self.nlist, metric)
        else:
            if self.pq_bytes is None:
                self.pq_bytes = _divisor_near(dim, dim // 80)
            if dim % self.pq_bytes:
                raise GalleryIndexError(
                    f"`pq_bytes` must divide the dimension {dim}. Received: {self.pq_bytes}"
                )
            index = faiss.IndexIVFPQ(quantizer, dim, self.nlist, self.pq_bytes, 8, metric)
        index.cp.niter = IVF_TRAIN_ITERATIONS
        index.cp.spherical = self.metric == "cosine"
        return index

    def _set_query_options(self, nprobe, ef_search):
        faiss = self._faiss
        if self._kind in ("ivf", "ivfpq"):
            lists = faiss.extract_index_ivf(self._index).nlist
            value = int(nprobe or self.nprobe or max(8, round(DEFAULT_NPROBE_FRACTION * lists)))
            if value < 1:
                raise GalleryIndexError(f"`nprobe` must be >= 1. Received: {nprobe}")
            faiss.extract_index_ivf(self._index).nprobe = value
        elif self._kind == "hnsw":
            value = int(ef_search or self.ef_search)
            if value < 1:
                raise GalleryIndexError(f"`ef_search` must be >= 1. Received: {ef_search}")
            faiss.downcast_index(self._index.index).hnsw.efSearch = value

    def _stored_vectors(self):
        """`(ids, vectors)` of a flat or HNSW index, in order of addition."""
        faiss = self._faiss
        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        inner = faiss.downcast_index(self._index.index)
        storage = inner if self._kind == "flat" else faiss.downcast_index(inner.storage)
        return ids, storage.reconstruct_n(0, storage.ntotal)


def _are_paths(queries):
    if isinstance(queries, (str, os.PathLike)):
        return True
    if isinstance(queries, np.ndarray):
        return queries.dtype.kind in "USO"
    return isinstance(queries, (list, tuple)) and all(
        isinstance(query, (str, os.PathLike)) for query in queries
    )


def _divisor_near(dim, target):
    """The divisor of `dim` nearest `target` (at least 1)."""
    divisors = [d for d in range(1, dim + 1) if dim % d == 0]
    return min(divisors, key=lambda d: (abs(d - max(target, 1)), d))


def _fsync(path):
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def _fsync_directory(directory):
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # Not every system opens directories (Windows); the rename is still atomic.
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
