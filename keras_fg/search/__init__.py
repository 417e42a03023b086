"""Person search: a persistent gallery index of embeddings on faiss (`pip install -e ".[search]"`).

GalleryIndex.build(model, image_paths)   embed a gallery once, search it in milliseconds
GalleryIndex.load(directory, model)      refuses an index built with another model
set_num_threads(n)                       faiss' OpenMP threads

faiss itself is imported when an index is first made or loaded, so `import keras_fg.search`
works without it; a missing faiss is then one line naming the extra.
"""

from keras_fg.search.gallery_index import (
    AUTO_FLAT_BELOW,
    DEFAULT_EF_SEARCH,
    DEFAULT_NPROBE,
    INDEX_TYPES,
    METRICS,
    FaissMissingError,
    GalleryIndex,
    GalleryIndexError,
    entry_record,
    import_faiss,
    set_num_threads,
)
