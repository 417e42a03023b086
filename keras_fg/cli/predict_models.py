"""The three forms predict.py runs: a `.keras` file, a SavedModel directory, a `.tflite` file.

Each is wrapped in a `Predictor` with the same face: `image_size`, `predict(images)` on float32
images `(B, height, width, 3)` in [0, 255] (prepared by
`keras_fg.export.preprocess.decode_and_resize`), returning NumPy `probabilities`, `features`
and, for the attention families, `attention_maps`; and `class_name(index)`, the name of a
class or `None` when the form does not carry it.

Where the class names come from:
- `.keras`: `model.class_names`, saved with the model;
- SavedModel: the `report.json` that `export.py` writes beside it
  (`DIR/report.json` for `DIR/saved_model/<name>/<version>/`), else the names its
  `top_k_class_names` output returns for the classes it ranks first;
- `.tflite`: the `labels.txt` stored inside the file (`keras_fg.export.tflite.read_labels`),
  else the `report.json` beside it, when it lists that file.
"""

import json
from pathlib import Path

import numpy as np

FORMS = ("keras", "saved_model", "tflite")
OUTPUTS = ("probabilities", "features", "attention_maps")
REPORT = "report.json"


class PredictInputError(ValueError):
    """Unusable input of predict.py (a missing path, an unknown model form); one line."""


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


def load_predictor(path):
    """The `Predictor` for a `.keras` file, a SavedModel directory or a `.tflite` file.

    Raises:
        PredictInputError: a missing path, an unknown form, or a file that does not load.
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


class KerasPredictor(Predictor):
    form = "keras"

    def __init__(self, path):
        super().__init__(path)
        import keras

        import keras_fg.models  # noqa: F401  (registers the model classes for loading)

        self.model = keras.saving.load_model(path)
        if not isinstance(self.model.output, dict) or "probabilities" not in self.model.output:
            raise PredictInputError(
                f"{path} is not a keras_fg model: it has no 'probabilities' output"
            )
        self.image_size = tuple(self.model.input_shape[1:3])
        self.class_names = getattr(self.model, "class_names", None)

    def predict(self, images):
        outputs = self.model.predict_on_batch(np.asarray(images, "float32"))
        return {name: np.asarray(outputs[name]) for name in OUTPUTS if name in outputs}


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
