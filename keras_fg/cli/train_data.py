"""The data side of train.py: which images train and evaluate, and how a run is scored."""

import dataclasses

import numpy as np

from keras_fg.data import (
    ImageRecords,
    PKSampler,
    SkipCounter,
    SyntheticFineGrained,
    load_dataset,
    make_pipeline,
)
from keras_fg.metrics.attention import attention_report
from keras_fg.models.fine_grained_model import predict_batch

EVALUATION_SPLITS = {"cub": "test", "cars": "test", "dogs": "test", "aircraft": "test"}


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """What the data of a run is read with: train.py's flags of the same names.

    `format` is a `load_dataset` format, "synthetic" or, for re-ID, "folder" (a folder per
    person) or "market1501"; `image_size` is (size,) or (height, width).
    """

    format: str = "synthetic"
    data: str | None = None
    image_size: tuple = (64,)
    batch_size: int = 32
    seed: int = 0
    augment: tuple = ()
    eval_resize: str = "resize"
    strict_data: bool = False
    max_train_images: int | None = None
    max_test_images: int | None = None
    validation_fraction: float | None = None
    annotation: str = "variant"
    synthetic_classes: int = 10
    synthetic_train: int = 2000
    synthetic_test: int = 500
    synthetic_clutter: int = 6
    synthetic_noise: float = 8.0
    # Re-ID only.
    num_identities: int = 8
    num_instances: int = 4
    random_erasing: bool = False
    part_weights: str = "fisher"
    reid_metric: str = "cosine"
    flip_test: bool = False
    re_ranking: bool = False

    @classmethod
    def from_args(cls, args, **changes):
        """The settings of a parsed train.py command line (`changes` override some)."""
        values = {field.name: getattr(args, field.name) for field in dataclasses.fields(cls)}
        values["image_size"] = tuple(values["image_size"])
        values["augment"] = tuple(values["augment"] or ())
        return cls(**{**values, **changes})

    @property
    def size(self):
        """The pipeline's image size: an int for square images, else (height, width)."""
        return self.image_size if len(self.image_size) == 2 else self.image_size[0]


def _limit(source, count, seed):
    """At most `count` items of an ImageRecords or (images, labels) source, drawn at random."""
    size = len(source) if isinstance(source, ImageRecords) else len(source[1])
    if count is None or count >= size:
        return source
    keep = np.sort(np.random.default_rng(seed).permutation(size)[:count])
    if isinstance(source, ImageRecords):
        return source.subset(keep)
    return tuple(part[keep] for part in source)


class ClassificationData:
    """Training and evaluation images of a classification run."""

    def __init__(self, settings):
        self.settings = settings
        self.counter = SkipCounter()
        self.boxes = None
        if settings.format == "synthetic":
            synthetic = SyntheticFineGrained(
                num_classes=settings.synthetic_classes,
                image_size=settings.image_size[0],
                num_train=settings.synthetic_train,
                num_test=settings.synthetic_test,
                seed=settings.seed,
                clutter=settings.synthetic_clutter,
                noise=settings.synthetic_noise,
            )
            self.train = (synthetic.x_train, synthetic.y_train)
            self.test = (synthetic.x_test, synthetic.y_test)
            self.boxes = synthetic.boxes_test
            self.class_names = synthetic.class_names
        else:
            options = {}
            if settings.format == "aircraft":
                options["annotation"] = settings.annotation
            if settings.format == "folder" and settings.validation_fraction:
                options.update(validation_fraction=settings.validation_fraction, seed=settings.seed)
            self.train = load_dataset(settings.format, settings.data, "train", **options)
            self.test = self._evaluation_records(options)
            self.class_names = self.train.class_names
        self.train = _limit(self.train, settings.max_train_images, settings.seed)
        if settings.max_test_images is not None:
            self.test = _limit(self.test, settings.max_test_images, settings.seed)
            self.boxes = None
        self._validation = None

    def _evaluation_records(self, options):
        settings = self.settings
        if settings.format in EVALUATION_SPLITS:
            return load_dataset(
                settings.format, settings.data, EVALUATION_SPLITS[settings.format], **options
            )
        errors = []
        for split in ("test", "val"):
            try:
                return load_dataset(settings.format, settings.data, split, **options)
            except (ValueError, FileNotFoundError) as error:
                errors.append(str(error))
        raise FileNotFoundError(
            f"no evaluation images in {settings.data}: give it a test/ or val/ folder, or pass "
            f"--validation-fraction ({'; '.join(errors)})"
        )

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def train_labels(self):
        return self.train.labels if isinstance(self.train, ImageRecords) else self.train[1]

    @property
    def evaluation_size(self):
        return len(self.test) if isinstance(self.test, ImageRecords) else len(self.test[1])

    def steps_per_epoch(self, batch_size):
        return max(1, len(self.train_labels) // batch_size)

    def _pipeline(self, source, training, seed, batch_size=None, **options):
        settings = self.settings
        return make_pipeline(
            source,
            settings.size,
            batch_size or settings.batch_size,
            training=training,
            seed=seed,
            augment=list(settings.augment) or None,
            resize_mode=settings.eval_resize,
            strict=settings.strict_data,
            skip_counter=self.counter,
            num_classes=self.num_classes,
            **options,
        )

    def pipeline(self, training=False, limit=None):
        """Training images as evaluated (whole, resized), at most `limit` of them."""
        seed = self.settings.seed
        source = _limit(self.train, limit, seed) if limit else self.train
        return self._pipeline(source, training, seed)

    def training_dataset(self, first, end):
        """Augmented training batches of epochs [first, end), each a function of
        (seed, epoch) alone, `steps_per_epoch` batches each."""
        return self._pipeline(
            self.train,
            True,
            self.settings.seed,
            epochs=(first, end),
            steps_per_epoch=self.steps_per_epoch(self.settings.batch_size),
        )

    def cache_source(self, split="train"):
        """What a feature cache reads: `(pipeline, count, source)`, the images of `split`
        ("train" or "evaluation") whole and resized, in order; `source` names them for the
        cache's fingerprint."""
        images = self.train if split == "train" else self.test
        if isinstance(images, ImageRecords):
            source = (np.asarray(images.paths).astype("S"), images.labels)
        else:
            source = images
        # Unaugmented, in their order, labels as integers (`num_classes` drops one-hot).
        settings = self.settings
        pipeline = make_pipeline(
            images,
            settings.size,
            settings.batch_size,
            training=False,
            resize_mode=settings.eval_resize,
            strict=settings.strict_data,
            skip_counter=self.counter,
        )
        return pipeline, len(images) if isinstance(images, ImageRecords) else len(images[1]), source

    def validation_pipeline(self):
        if self._validation is None:
            self._validation = self._pipeline(self.test, False, self.settings.seed)
        return self._validation

    def sample_images(self, count):
        images, labels = next(iter(self._pipeline(_limit(self.test, count, 0), False, 0, count)))
        labels = labels.numpy()
        return images.numpy(), labels.argmax(-1) if labels.ndim == 2 else labels

    def evaluate(self, model):
        from keras_fg.metrics import classification_report

        probabilities, labels, maps = [], [], []
        for images, batch_labels in self.validation_pipeline():
            outputs = predict_batch(model, images)
            probabilities.append(np.asarray(outputs["probabilities"]))
            batch_labels = batch_labels.numpy()
            labels.append(batch_labels.argmax(-1) if batch_labels.ndim == 2 else batch_labels)
            if "attention_maps" in outputs and self.boxes is not None:
                maps.append(np.asarray(outputs["attention_maps"]))
        report = classification_report(
            np.concatenate(labels), np.concatenate(probabilities), class_names=self.class_names
        )
        if maps and self.counter.count == 0:
            # Synthetic data: pointing game and mass inside the true part, beside chance.
            report["attention"] = attention_report(
                np.concatenate(maps), self.boxes, self.settings.image_size[0]
            )
        return report

    def skipped_images(self):
        return self.counter.count


class ReidData:
    """Market-1501-layout training identities, queries and gallery of a re-ID run."""

    def __init__(self, settings):
        self.settings = settings
        self.counter = SkipCounter()
        if settings.format == "folder":
            from keras_fg.data import load_identity_folders

            # One folder per person, no camera ids: every image is given a camera of its own,
            # so that the part weights and the evaluation count every other image of a person
            # as a match; the test images are queries and gallery at once (leave-one-out).
            train, test = (
                load_identity_folders(settings.data, split) for split in ("train", "test")
            )
            train.cameras = np.arange(len(train), dtype=np.int32)
            test.cameras = np.arange(len(test), dtype=np.int32)
            self.train = _limit(train, settings.max_train_images, settings.seed)
            self.query = self.gallery = test
            self.protocol = "all_other_images"
        else:
            self.train = _limit(
                load_dataset("market1501", settings.data, "train"),
                settings.max_train_images,
                settings.seed,
            )
            self.query = load_dataset("market1501", settings.data, "query")
            self.gallery = load_dataset("market1501", settings.data, "gallery")
            self.protocol = "market1501"
        self.class_names = self.train.class_names
        self.sampler = PKSampler(
            self.train.labels, settings.num_identities, settings.num_instances, seed=settings.seed
        )

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def train_labels(self):
        return self.train.labels

    @property
    def evaluation_size(self):
        if self.query is self.gallery:  # Folders of people: every image is both.
            return len(self.query)
        return len(self.query) + len(self.gallery)

    def steps_per_epoch(self, batch_size):
        return max(1, len(self.sampler.epoch_batches(0)))

    def pipeline(self, training=False, limit=None):
        """Training images as evaluated (resized), at most `limit` of them."""
        settings = self.settings
        source = _limit(self.train, limit, settings.seed) if limit else self.train
        return make_pipeline(
            source,
            settings.image_size,
            settings.batch_size,
            training=False,
            strict=settings.strict_data,
            skip_counter=self.counter,
        )

    def training_dataset(self, first, end):
        """P x K batches of epochs [first, end), each epoch the sampler's draw for it,
        `steps_per_epoch` batches long."""
        settings = self.settings
        augment = list(settings.augment)
        if settings.random_erasing and "random_erasing" not in augment:
            augment.append("random_erasing")
        return make_pipeline(
            self.train,
            settings.image_size,
            settings.batch_size,
            training=True,
            seed=settings.seed,
            sampler=self.sampler,
            augment=augment,
            strict=settings.strict_data,
            skip_counter=self.counter,
            epochs=(first, end),
            steps_per_epoch=self.steps_per_epoch(settings.batch_size),
        )

    def validation_pipeline(self):
        return None

    def embed(self, model, records, output="features"):
        """Embeddings (`model`'s `output`) of `records` and their mirror images; indices read."""
        settings = self.settings
        indexed = ImageRecords(
            records.paths, np.arange(len(records)), [str(i) for i in range(len(records))]
        )
        pipeline = make_pipeline(
            indexed,
            settings.image_size,
            settings.batch_size,
            training=False,
            strict=settings.strict_data,
            skip_counter=self.counter,
        )
        features, flipped, indices = [], [], []
        for images, batch_indices in pipeline:
            features.append(np.asarray(predict_batch(model, images)[output]))
            flipped.append(np.asarray(predict_batch(model, images[:, :, ::-1])[output]))
            indices.append(batch_indices.numpy())
        return np.concatenate(features), np.concatenate(flipped), np.concatenate(indices)

    def fit_part_weights(self, model, max_images=2000):
        """Adapts the model's `PartWeightedEmbedding` on (at most `max_images`) training images.

        Returns what `adapt` returns, or None for a model without one or `--part-weights equal`.
        """
        import keras

        from keras_fg.layers import PartWeightedEmbedding

        layers = [layer for layer in model.layers if isinstance(layer, PartWeightedEmbedding)]
        if not layers or self.settings.part_weights == "equal":
            return None
        (layer,) = layers
        sample = _limit(self.train, max_images, self.settings.seed)
        probe = keras.Model(model.input, {"parts": layer.input})
        parts, _, index = self.embed(probe, sample, output="parts")
        try:
            return layer.adapt(parts, sample.labels[index], sample.cameras[index])
        except ValueError as error:  # No person seen by two cameras: nothing to weigh by.
            print(f"Part weights left equal. {error}")
            return None

    def evaluate(self, model):
        from keras_fg.metrics import PROTOCOLS, evaluate_reid

        settings = self.settings
        query, query_flipped, query_index = self.embed(model, self.query)
        if self.gallery is self.query:  # Without cameras: one set, each image against the rest.
            gallery, gallery_flipped, gallery_index = query, query_flipped, query_index
        else:
            gallery, gallery_flipped, gallery_index = self.embed(model, self.gallery)
        ids = (
            self.query.labels[query_index],
            self.query.cameras[query_index],
            self.gallery.labels[gallery_index],
            self.gallery.cameras[gallery_index],
        )
        # Every evaluation variant is cheap beside training, so all four are reported (the
        # re-ranked ones when re-ranking fits in memory, or was asked for); the top-level
        # figures are the variant --flip-test / --re-ranking chose.
        variants = {}
        fits = len(query) + len(gallery) <= 20_000  # evaluate_reid's max_re_ranking_items
        re_rankings = (False, True) if settings.re_ranking or fits else (False,)

        def variant(flip, re_ranking):
            return "_".join(["flip" if flip else "plain"] + (["re_ranking"] if re_ranking else []))

        for flip in (False, True):
            q = (query + query_flipped) / 2 if flip else query
            g = (gallery + gallery_flipped) / 2 if flip else gallery
            for re_ranking in re_rankings:
                variants[variant(flip, re_ranking)] = evaluate_reid(
                    q,
                    ids[0],
                    ids[1],
                    g,
                    ids[2],
                    ids[3],
                    metric=settings.reid_metric,
                    re_ranking=re_ranking,
                )
        result = dict(variants[variant(settings.flip_test, settings.re_ranking)])
        result["variants"] = variants
        result["num_query_images"] = len(query)
        result["num_gallery_images"] = len(gallery)
        result["protocol"] = self.protocol
        result["protocol_description"] = PROTOCOLS[self.protocol]
        return result

    def sample_images(self, count):
        settings = self.settings
        records = self.query.subset(np.arange(min(count, len(self.query))))
        images, _ = next(
            iter(
                make_pipeline(
                    ImageRecords(records.paths, np.zeros(len(records)), ["0"]),
                    settings.image_size,
                    count,
                    training=False,
                    skip_counter=self.counter,
                )
            )
        )
        return images.numpy(), None

    def skipped_images(self):
        return self.counter.count
