"""SavedModel export for TF Serving: encoded images in, probabilities, top-k and features out."""

import keras
import tensorflow as tf

from keras_fg.export.errors import require_tensorflow_backend
from keras_fg.export.preprocess import decode_and_resize

SERVING_SIGNATURE = "serving_default"
IMAGES_SIGNATURE = "predict_images"
SERVED_OUTPUTS = ("features", "attention_maps")


def export_saved_model(model, path, top_k=5, class_names=None):
    """Writes `model` as a SavedModel with two signatures, ready for TF Serving.

    - `serving_default`: input `image_bytes`, a 1-D string tensor of encoded images (JPEG, PNG,
      GIF, BMP). Each is decoded and resized inside the graph by
      `keras_fg.export.preprocess.decode_and_resize` (the whole image, bilinear with
      antialias, no crop), then fed to the model. A request holding bytes that are not an
      image fails with an `InvalidArgumentError` for that request alone.
    - `predict_images`: input `images`, float32 `(B, height, width, 3)` raw pixels in [0, 255].

    Both return `probabilities` `(B, num_classes)`, `top_k_indices` (int32) and
    `top_k_scores` `(B, k)` with `k = min(top_k, num_classes)`, `top_k_class_names` (string;
    the index as a string when the model has no class names), `features` (the embedding
    used for re-identification) and, for the attention families, `attention_maps`.

    The SavedModel needs neither Keras nor keras_fg to load: `tf.saved_model.load(path)`.

    Args:
        model: a keras_fg model (a dict of outputs with at least `"probabilities"`).
        path: the directory to write (for TF Serving, `<base>/<model_name>/<version>`).
        top_k: how many of the best classes to return.
        class_names: the class names; default `model.class_names`.

    Returns:
        The list of signature names written.

    Example:

    >>> export_saved_model(model, "exports/saved_model/birds/1")
    >>> served = tf.saved_model.load("exports/saved_model/birds/1")
    >>> served.signatures["serving_default"](image_bytes=tf.constant([jpeg_bytes]))
    """
    require_tensorflow_backend()
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"`top_k` must be an integer >= 1. Received: top_k={top_k}")
    num_classes = model.output["probabilities"].shape[-1]
    class_names = class_names or getattr(model, "class_names", None)
    if class_names is None:
        class_names = [str(index) for index in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(
            f"`class_names` must have {num_classes} entries. Received: {len(class_names)} names"
        )
    k = min(top_k, num_classes)
    height, width = model.input_shape[1:3]

    def predict_images(images):
        predictions = model(images, training=False)
        probabilities = predictions["probabilities"]
        scores, indices = tf.math.top_k(probabilities, k=k)
        outputs = {
            "probabilities": probabilities,
            "top_k_indices": indices,
            "top_k_scores": scores,
            "top_k_class_names": tf.gather(tf.constant(class_names), indices),
        }
        outputs.update({name: predictions[name] for name in SERVED_OUTPUTS if name in predictions})
        return outputs

    def serving_default(image_bytes):
        images = tf.map_fn(
            lambda data: decode_and_resize(data, (height, width)),
            image_bytes,
            fn_output_signature=tf.TensorSpec((height, width, 3), tf.float32),
        )
        return predict_images(images)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        SERVING_SIGNATURE,
        serving_default,
        input_signature=[tf.TensorSpec((None,), tf.string, name="image_bytes")],
    )
    archive.add_endpoint(
        IMAGES_SIGNATURE,
        predict_images,
        input_signature=[tf.TensorSpec((None, height, width, 3), tf.float32, name="images")],
    )
    archive.write_out(str(path), verbose=False)
    return [SERVING_SIGNATURE, IMAGES_SIGNATURE]

