"""The data side of train.py: which images train and evaluate, and how a run is scored."""

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

    def __init__(self, args):
        self.counter = SkipCounter()
        self.boxes = None
        if args.format == "synthetic":
            synthetic = SyntheticFineGrained(
                num_classes=args.synthetic_classes,
                image_size=args.image_size[0],
                num_train=args.synthetic_train,
                num_test=args.synthetic_test,
                seed=args.seed,
            )
            self.train = (synthetic.x_train, synthetic.y_train)
            self.test = (synthetic.x_test, synthetic.y_test)
            self.boxes = synthetic.boxes_test
            self.class_names = synthetic.class_names
        else:
            options = {}
            if args.format == "aircraft":
                options["annotation"] = args.annotation
            if args.format == "folder" and args.validation_fraction:
                options.update(validation_fraction=args.validation_fraction, seed=args.seed)
            self.train = load_dataset(args.format, args.data, "train", **options)
            self.test = self._evaluation_records(args, options)
            self.class_names = self.train.class_names
        self.train = _limit(self.train, args.max_train_images, args.seed)
        if args.max_test_images is not None:
            self.test = _limit(self.test, args.max_test_images, args.seed)
            self.boxes = None
        self._validation = None

    @staticmethod
    def _evaluation_records(args, options):
        if args.format in EVALUATION_SPLITS:
            return load_dataset(args.format, args.data, EVALUATION_SPLITS[args.format], **options)
        errors = []
        for split in ("test", "val"):
            try:
                return load_dataset(args.format, args.data, split, **options)
            except (ValueError, FileNotFoundError) as error:
                errors.append(str(error))
        raise FileNotFoundError(
            f"no evaluation images in {args.data}: give it a test/ or val/ folder, or pass "
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

    def _pipeline(self, source, args, training, seed, batch_size=None, **options):
        return make_pipeline(
            source,
            tuple(args.image_size) if len(args.image_size) == 2 else args.image_size[0],
            batch_size or args.batch_size,
            training=training,
            seed=seed,
            augment=args.augment or None,
            resize_mode=args.eval_resize,
            strict=args.strict_data,
            skip_counter=self.counter,
            num_classes=self.num_classes,
            **options,
        )

    def pipeline(self, args, training=False, limit=None):
        """Training images as evaluated (whole, resized), at most `limit` of them."""
        source = _limit(self.train, limit, args.seed) if limit else self.train
        return self._pipeline(source, args, training, args.seed)

    def training_dataset(self, args, first, end):
        """Augmented training batches of epochs [first, end), each a function of
        (seed, epoch) alone, `steps_per_epoch` batches each."""
        return self._pipeline(
            self.train,
            args,
            True,
            args.seed,
            epochs=(first, end),
            steps_per_epoch=self.steps_per_epoch(args.batch_size),
        )

    def cache_source(self, args, split="train"):
        """What a feature cache reads: `(pipeline, count, source)`, the images of `split`
        ("train" or "evaluation") whole and resized, in order; `source` names them for the
        cache's fingerprint."""
        images = self.train if split == "train" else self.test
        if isinstance(images, ImageRecords):
            source = (np.asarray(images.paths).astype("S"), images.labels)
        else:
            source = images
        # Unaugmented, in their order, labels as integers (`num_classes` drops one-hot).
        pipeline = make_pipeline(
            images,
            tuple(args.image_size) if len(args.image_size) == 2 else args.image_size[0],
            args.batch_size,
            training=False,
            resize_mode=args.eval_resize,
            strict=args.strict_data,
            skip_counter=self.counter,
        )
        return pipeline, len(images) if isinstance(images, ImageRecords) else len(images[1]), source

    def validation_pipeline(self, args):
        if self._validation is None:
            self._validation = self._pipeline(self.test, args, False, args.seed)
        return self._validation

    def sample_images(self, args, count):
        images, labels = next(
            iter(self._pipeline(_limit(self.test, count, 0), args, False, 0, count))
        )
        labels = labels.numpy()
        return images.numpy(), labels.argmax(-1) if labels.ndim == 2 else labels

    def evaluate(self, model, args):
        from keras_fg.metrics import classification_report

        probabilities, labels, maps = [], [], []
        for images, batch_labels in self.validation_pipeline(args):
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
                np.concatenate(maps), self.boxes, args.image_size[0]
            )
        return report

    def skipped_images(self):
        return self.counter.count


class ReidData:
    """Market-1501-layout training identities, queries and gallery of a re-ID run."""

    def __init__(self, args):
        self.counter = SkipCounter()
        if args.format == "folder":
            from keras_fg.data import load_identity_folders

            # One folder per person, no camera ids: every image is given a camera of its own,
            # so that the part weights and the evaluation count every other image of a person
            # as a match; the test images are queries and gallery at once (leave-one-out).
            train, test = (load_identity_folders(args.data, split) for split in ("train", "test"))
            train.cameras = np.arange(len(train), dtype=np.int32)
            test.cameras = np.arange(len(test), dtype=np.int32)
            self.train = _limit(train, args.max_train_images, args.seed)
            self.query = self.gallery = test
            self.protocol = "all_other_images"
        else:
            self.train = _limit(
                load_dataset("market1501", args.data, "train"), args.max_train_images, args.seed
            )
            self.query = load_dataset("market1501", args.data, "query")
            self.gallery = load_dataset("market1501", args.data, "gallery")
            self.protocol = "market1501"
        self.class_names = self.train.class_names
        self.sampler = PKSampler(
            self.train.labels, args.num_identities, args.num_instances, seed=args.seed
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

    def pipeline(self, args, training=False, limit=None):
        """Training images as evaluated (resized), at most `limit` of them."""
        source = _limit(self.train, limit, args.seed) if limit else self.train
        return make_pipeline(
            source,
            tuple(args.image_size),
            args.batch_size,
            training=False,
            strict=args.strict_data,
            skip_counter=self.counter,
        )

    def training_dataset(self, args, first, end):
        """P x K batches of epochs [first, end), each epoch the sampler's draw for it,
        `steps_per_epoch` batches long."""
        augment = list(args.augment or [])
        if args.random_erasing and "random_erasing" not in augment:
            augment.append("random_erasing")
        return make_pipeline(
            self.train,
            tuple(args.image_size),
            args.batch_size,
            training=True,
            seed=args.seed,
            sampler=self.sampler,
            augment=augment,
            strict=args.strict_data,
            skip_counter=self.counter,
            epochs=(first, end),
            steps_per_epoch=self.steps_per_epoch(args.batch_size),
        )

    def validation_pipeline(self, args):
        return None

    def embed(self, model, records, args, output="features"):
        """Embeddings (`model`'s `output`) of `records` and their mirror images; indices read."""
        indexed = ImageRecords(
            records.paths, np.arange(len(records)), [str(i) for i in range(len(records))]
        )
        pipeline = make_pipeline(
            indexed,
            tuple(args.image_size),
            args.batch_size,
            training=False,
            strict=args.strict_data,
            skip_counter=self.counter,
        )
        features, flipped, indices = [], [], []
        for images, batch_indices in pipeline:
            features.append(np.asarray(predict_batch(model, images)[output]))
            flipped.append(np.asarray(predict_batch(model, images[:, :, ::-1])[output]))
            indices.append(batch_indices.numpy())
        return np.concatenate(features), np.concatenate(flipped), np.concatenate(indices)

    def fit_part_weights(self, model, args, max_images=2000):
        """Adapts the model's `PartWeightedEmbedding` on (at most `max_images`) training images.

        Returns what `adapt` returns, or None for a model without one or `--part-weights equal`.
        """
        import keras

        from keras_fg.layers import PartWeightedEmbedding

        layers = [layer for layer in model.layers if isinstance(layer, PartWeightedEmbedding)]
        if not layers or args.part_weights == "equal":
            return None
        (layer,) = layers
        sample = _limit(self.train, max_images, args.seed)
        probe = keras.Model(model.input, {"parts": layer.input})
        parts, _, index = self.embed(probe, sample, args, output="parts")
        try:
            return layer.adapt(parts, sample.labels[index], sample.cameras[index])
        except ValueError as error:  # No person seen by two cameras: nothing to weigh by.
            print(f"Part weights left equal. {error}")
            return None

    def evaluate(self, model, args):
        from keras_fg.metrics import PROTOCOLS, evaluate_reid

        query, query_flipped, query_index = self.embed(model, self.query, args)
        if self.gallery is self.query:  # Without cameras: one set, each image against the rest.
            gallery, gallery_flipped, gallery_index = query, query_flipped, query_index
        else:
            gallery, gallery_flipped, gallery_index = self.embed(model, self.gallery, args)
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
        re_rankings = (False, True) if args.re_ranking or fits else (False,)

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
                    metric=args.reid_metric,
                    re_ranking=re_ranking,
                )
        result = dict(variants[variant(args.flip_test, args.re_ranking)])
        result["variants"] = variants
        result["num_query_images"] = len(query)
        result["num_gallery_images"] = len(gallery)
        result["protocol"] = self.protocol
        result["protocol_description"] = PROTOCOLS[self.protocol]
        return result

    def sample_images(self, args, count):
        records = self.query.subset(np.arange(min(count, len(self.query))))
        images, _ = next(
            iter(
                make_pipeline(
                    ImageRecords(records.paths, np.zeros(len(records)), ["0"]),
                    tuple(args.image_size),
                    count,
                    training=False,
                    skip_counter=self.counter,
                )
            )
        )
        return images.numpy(), None

    def skipped_images(self):
        return self.counter.count
