"""The two ways an export can fail: its input is unusable, or the export itself failed."""


class ExportInputError(ValueError):
    """The input of an export is unusable.

    A missing or corrupt model file, an unknown format, a missing data folder, an output
    directory that already holds the version. The message is one line that names it.
    """


class ExportError(RuntimeError):
    """An export failed: a conversion error or an op that is not a TFLite builtin.

    The message is one line that names the file or format concerned.
    """


def require_tensorflow_backend():
    """Raises `ExportError` unless Keras runs on TensorFlow (SavedModel and TFLite need it)."""
    import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ExportError(
            f"Export needs the TensorFlow backend (KERAS_BACKEND=tensorflow); Keras runs on "
            f"{backend!r}. Save the model as .keras (it loads on every backend) and export it "
            f"under TensorFlow."
        )
