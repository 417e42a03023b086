"""Running a trained model in any form the project serves: `.keras`, SavedModel, `.tflite`.

`predict.py` and `keras_fg.search` both embed images through this module. Each form is
wrapped in a `Predictor` with the same face: `image_size`, `predict(images)` on float32 images `(B, height, width, 3)` in [0, 255] (prepared by
`keras_fg.export.preprocess.decode_and_resize`), returning NumPy `probabilities`, `features`
and, for the attention families, `attention_maps`; `class_name(index)`, the name of a
class or `None` when the form does not carry it; and `fingerprint()`, a hash of the weights and
input size that tells whether two predictors compute the same embeddings.

Where the class names come from:
- `.keras`: `model.class_names`, saved with the model;
- SavedModel: the `report.json` that `export.py` writes beside it
  (`DIR/report.json` for `DIR/saved_model/<name>/<version>/`), else the names its
  `top_k_class_names` output returns for the classes it ranks first;
- `.tflite`: the `labels.txt` stored inside the file (`keras_fg.export.tflite.read_labels`),
  else the `report.json` beside it, when it lists that file.
"""

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

FORMS = ("keras", "saved_model", "tflite")
OUTPUTS = ("probabilities", "features", "attention_maps")
REPORT = "report.json"


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")  # What decode_and_resize reads.


class PredictInputError(ValueError):
    """Unusable input of predict.py (a missing path, an unknown model form); one line."""


class UnreadableImage(Exception):
    """One image file that cannot be read or decoded; its message is the reason."""


def detect_form(path):
    """`("keras" | "saved_model" | "tflite", path)`; a SavedModel base directory resolves to
    its highest version, as TF Serving does."""
    path = Path(path)
    if not path.exists():
        raise PredictInputError(f"Model not found: {path}")
    if path.is_file() and path.suffix == ".keras":
        return "keras", path
    if path.is_file() and path.suffix == ".tflite":
        return "tflite", path
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return "saved_model", path
        versions = [
            child
            for child in path.iterdir()
            if child.name.isdigit() and (child / "saved_model.pb").is_file()
        ]
        if versions:
            return "saved_model", max(versions, key=lambda child: int(child.name))
    raise PredictInputError(
        f"Unknown model form: {path} (expected a .keras file, a SavedModel directory or a "
        ".tflite file)"
    )


def as_predictor(model_or_predictor):
    """A `Predictor` from a predictor, a Keras model in memory, or a model's path.

    Args:
        model_or_predictor: a `Predictor`, a `keras.Model`, or the path of a `.keras` file, a
            SavedModel directory or a `.tflite` file.

    Returns:
        A `Predictor`.

    Raises:
        PredictInputError: a path that does not load (see `load_predictor`).
    """
    if isinstance(model_or_predictor, Predictor):
        return model_or_predictor
    if isinstance(model_or_predictor, (str, os.PathLike)):
        return load_predictor(model_or_predictor)
    return KerasPredictor.from_model(model_or_predictor)


def load_predictor(path):
    """The `Predictor` for a `.keras` file, a SavedModel directory or a `.tflite` file.

    Args:
        path: the model's file or directory.

    Returns:
        A `KerasPredictor`, `SavedModelPredictor` or `TFLitePredictor`.

    Raises:
        PredictInputError: a missing path, an unknown form, or a file that does not load.

    Example:

    >>> predictor = load_predictor("runs/latest/model.keras")  # doctest: +SKIP
    >>> predictor.predict(images)["features"].shape             # doctest: +SKIP
    (8, 1280)
    """
    form, path = detect_form(path)
    loaders = dict(zip(FORMS, (KerasPredictor, SavedModelPredictor, TFLitePredictor)))
    try:
        return loaders[form](path)
    except PredictInputError:
        raise
    except Exception as error:  # Keras, TensorFlow and LiteRT raise many kinds on a bad file.
        reason = next((line for line in str(error).splitlines() if line.strip()), "")
        raise PredictInputError(
            f"Cannot load {form} model {path}: {reason[:200] or type(error).__name__}"
        ) from error


class Predictor:
    """A loaded model in one of `FORMS`. Subclasses set `image_size` and `class_names`."""

    form = None

    def __init__(self, path):
        self.path = Path(path)
        self.image_size = None  # (height, width)
        self.class_names = None

    def predict(self, images):
        raise NotImplementedError

    def class_name(self, index):
        """The name of class `index`, or `None` when the model does not carry names."""
        if self.class_names is None:
            return None
        return str(self.class_names[index])

    def fingerprint(self):
        """A hash of the weights and the input size: equal fingerprints, equal embeddings.

        Returns:
            A string `"<form>:<sha256 hex>"`, computed once and cached.
        """
        if getattr(self, "_fingerprint", None) is None:
            digest = hashlib.sha256(json.dumps(list(self.image_size)).encode())
            for part in self._weight_digests():
                digest.update(part)
            self._fingerprint = f"{self.form}:{digest.hexdigest()}"
        return self._fingerprint

    def _weight_digests(self):
        raise NotImplementedError


class KerasPredictor(Predictor):
    form = "keras"

    def __init__(self, path):
        super().__init__(path)
        import keras

        import keras_fg.models  # noqa: F401  (registers the model classes for loading)

        self._use(keras.saving.load_model(path))

    @classmethod
    def from_model(cls, model):
        """A predictor of a Keras model in memory (no file).

        Args:
            model: a keras_fg model (a dict of outputs with `"probabilities"` and `"features"`).

        Returns:
            A `KerasPredictor` whose `path` is `<in memory>`.
        """
        predictor = cls.__new__(cls)
        Predictor.__init__(predictor, "<in memory>")
        predictor._use(model)
        return predictor

    def _use(self, model):
        self.model = model
        if not isinstance(model.output, dict) or "probabilities" not in model.output:
            raise PredictInputError(
                f"{self.path} is not a keras_fg model: it has no 'probabilities' output"
            )
        self.image_size = tuple(model.input_shape[1:3])
        self.class_names = getattr(model, "class_names", None)

    def predict(self, images):
        outputs = self.model.predict_on_batch(np.asarray(images, "float32"))
        return {name: np.asarray(outputs[name]) for name in OUTPUTS if name in outputs}

    def _weight_digests(self):
        return _array_digests(weight.numpy() for weight in self.model.weights)


class SavedModelPredictor(Predictor):
    """A SavedModel from `keras_fg.export`, run through its `predict_images` signature."""

    form = "saved_model"

    def __init__(self, path):
        super().__init__(path)
        import tensorflow as tf

        loaded = tf.saved_model.load(str(path))
        if "predict_images" not in loaded.signatures:
            raise PredictInputError(
                f"SavedModel {path} has no 'predict_images' signature (export it with export.py)"
            )
        self._loaded = loaded  # The signature holds its variables only weakly.
        self._signature = loaded.signatures["predict_images"]
        spec = self._signature.structured_input_signature[1]["images"]
        self.image_size = tuple(spec.shape[1:3])
        # DIR/saved_model/<name>/<version>/ -> DIR/report.json
        self.class_names = names_from_report(
            path.parents[2] / REPORT, f"saved_model/{path.parent.name}/{path.name}"
        )
        self._names_seen = {}

    def predict(self, images):
        import tensorflow as tf

        outputs = self._signature(images=tf.constant(np.asarray(images, "float32")))
        outputs = {name: value.numpy() for name, value in outputs.items()}
        for indices, names in zip(outputs["top_k_indices"], outputs["top_k_class_names"]):
            self._names_seen.update(zip(indices.tolist(), (n.decode("utf-8") for n in names)))
        return {name: outputs[name] for name in OUTPUTS if name in outputs}

    def class_name(self, index):
        if self.class_names is not None:
            return str(self.class_names[index])
        return self._names_seen.get(index)

    def _weight_digests(self):
        return _array_digests(variable.numpy() for variable in self._loaded.variables)


class TFLitePredictor(Predictor):
    """A `.tflite` file from `keras_fg.export`: one image per call (its batch is 1)."""

    form = "tflite"

    def __init__(self, path):
        super().__init__(path)
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(path))
        if "serving_default" not in interpreter.get_signature_list():
            raise PredictInputError(
                f"TFLite model {path} has no 'serving_default' signature (export it with export.py)"
            )
        self._runner = interpreter.get_signature_runner("serving_default")
        shape = self._runner.get_input_details()["images"]["shape"]
        self.image_size = (int(shape[1]), int(shape[2]))
        from keras_fg.export.tflite import read_labels

        self.class_names = read_labels(path) or names_from_report(path.parent / REPORT, path.name)

    def predict(self, images):
        results = [self._runner(images=np.asarray(image, "float32")[None]) for image in images]
        return {
            name: np.concatenate([result[name] for result in results])
            for name in OUTPUTS
            if name in results[0]
        }

    def _weight_digests(self):
        # The weights are constants inside the flatbuffer: the file's bytes are the model.
        return [hashlib.sha256(self.path.read_bytes()).digest()]


def _array_digests(arrays):
    """The sorted hashes of `arrays`: the same set of weights in any order, the same list."""
    return sorted(
        hashlib.sha256(
            str(array.dtype).encode() + str(array.shape).encode() + array.tobytes()
        ).digest()
        for array in (np.ascontiguousarray(a) for a in arrays)
    )


def names_from_report(report_path, relative_file):
    """The class names in an export's `report.json`, when it lists `relative_file`."""
    try:
        with open(report_path) as file:
            report = json.load(file)
        files = [entry.get("file") for entry in report["exports"]]
        names = report["model"]["class_names"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return names if relative_file in files and isinstance(names, list) else None


# ---------------------------------------------------------------------------------------------
# Image files.


def list_images(path, role="Image"):
    """`[path]` for a file; the image files under a folder (any nesting), sorted.

    Args:
        path: an image file or a folder.
        role: the word that starts the error messages ("Image", "Gallery", ...).

    Returns:
        A list of `Path`s.

    Raises:
        PredictInputError: the path is missing, or a folder holds no image file.
    """
    path = Path(path)
    if not path.exists():
        raise PredictInputError(f"{role} path not found: {path}")
    if path.is_file():
        return [path]
    paths = sorted(
        Path(root) / name
        for root, _, names in os.walk(path)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not paths:
        raise PredictInputError(
            f"{role} folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return paths


def read_image(path, size):
    """The model's input pixels for one file, by `decode_and_resize` (serving's own rule).

    Raises:
        UnreadableImage: the file cannot be read or is not an image.
    """
    import tensorflow as tf

    from keras_fg.export.preprocess import decode_and_resize

    try:
        data = Path(path).read_bytes()
        return decode_and_resize(data, size).numpy()
    except OSError as error:
        raise UnreadableImage(error.strerror or str(error)) from error
    except tf.errors.OpError as error:  # Not an image, or a corrupt one.
        raise UnreadableImage(first_line(error.message)) from error


def predict_files(predictor, paths, batch_size=32, label="image", progress=None):
    """Reads, resizes and predicts `paths` in batches; unreadable files are named and skipped.

    Args:
        predictor: a `Predictor`.
        paths: image file paths.
        batch_size: images per model call.
        label: what the files are, for messages ("query", "gallery", ...).
        progress: optional object with `update(done)`, `message(text)` and `close()` (a
            progress bar); without one, nothing is printed.

    Returns:
        `(kept_paths, outputs, skipped)`: the model's outputs stacked over the images that
        were read, and `[{"image", "reason"}]` for those that were not.

    Raises:
        PredictInputError: not one of the files could be read.
    """
    kept, outputs, skipped = [], [], []
    for start in range(0, len(paths), batch_size):
        batch, images = [], []
        for path in paths[start : start + batch_size]:
            try:
                images.append(read_image(path, predictor.image_size))
                batch.append(path)
            except UnreadableImage as error:
                skipped.append({"image": str(path), "reason": str(error)})
                if progress is not None:
                    progress.message(f"skipped unreadable image {path}: {error}")
        if images:
            outputs.append(predictor.predict(np.stack(images)))
            kept += batch
        if progress is not None:
            progress.update(min(start + batch_size, len(paths)))
    if progress is not None:
        progress.close()
    if not kept:
        raise PredictInputError(
            f"no readable image among the {len(paths)} {label} file(s) "
            f"(first: {skipped[0]['image']}: {skipped[0]['reason']})"
        )
    return kept, {name: np.concatenate([o[name] for o in outputs]) for name in outputs[0]}, skipped


def first_line(message):
    """The gist of a TensorFlow error: its first line, without the op's wrapping."""
    line = next((line.strip() for line in str(message).splitlines() if line.strip()), "")
    line = re.sub(r"\s*\[Op:\w+\]$", "", re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", line))
    return line or "unreadable"
