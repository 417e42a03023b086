"""SavedModel export for TF Serving: encoded images in, probabilities, top-k and features out."""

import os

import keras
import numpy as np
import tensorflow as tf

from keras_fg.export.errors import require_tensorflow_backend
from keras_fg.export.preprocess import decode_and_resize

SERVING_SIGNATURE = "serving_default"
IMAGES_SIGNATURE = "predict_images"
SERVED_OUTPUTS = ("features", "attention_maps")
# TF Serving replays the PredictionLog records of this file when it loads a version, before
# the version takes requests, so that no client request pays for the first run's set-up.
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")


def export_saved_model(model, path, top_k=5, class_names=None, warmup_image=None, model_name=None):
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
    It carries TF Serving warm-up records, `assets.extra/tf_serving_warmup_requests`
    (`write_warmup_requests`): one request per signature, on `warmup_image`.

    Args:
        model: a keras_fg model (a dict of outputs with at least `"probabilities"`).
        path: the directory to write (for TF Serving, `<base>/<model_name>/<version>`).
        top_k: how many of the best classes to return.
        class_names: the class names; default `model.class_names`.
        warmup_image: the encoded image (bytes) of the warm-up requests; default a
            synthetic JPEG of the model's input size.
        model_name: the model name in the warm-up requests; default `model.name`.

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
    if warmup_image is None:
        warmup_image = _synthetic_jpeg((height, width))
    write_warmup_requests(path, warmup_image, model_name or model.name, (height, width))
    return [SERVING_SIGNATURE, IMAGES_SIGNATURE]


def write_warmup_requests(path, image_bytes, model_name, image_size):
    """Writes TF Serving's warm-up file of a SavedModel: one `PredictRequest` per signature.

    `path/assets.extra/tf_serving_warmup_requests` is a TFRecord file of
    `tensorflow.serving.PredictionLog` records (the tensorflow-serving-api protos): a request
    to `serving_default` with `image_bytes = [image_bytes]`, and one to `predict_images` with
    the same image decoded and resized, `(1, height, width, 3)`.

    Args:
        path: the SavedModel directory.
        image_bytes: an encoded image (JPEG, PNG, ...).
        model_name: the `model_spec.name` of the requests.
        image_size: the model's `(height, width)`.

    Returns:
        The path of the file written.
    """
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    pixels = decode_and_resize(tf.constant(image_bytes), image_size)[None]
    inputs = {
        SERVING_SIGNATURE: ("image_bytes", tf.make_tensor_proto([image_bytes], dtype=tf.string)),
        IMAGES_SIGNATURE: ("images", tf.make_tensor_proto(pixels.numpy())),
    }
    target = os.path.join(os.fspath(path), WARMUP_FILE)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tf.io.TFRecordWriter(target) as writer:
        for signature, (key, tensor) in inputs.items():
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature)
            )
            request.inputs[key].CopyFrom(tensor)
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())
    return target


def _synthetic_jpeg(size):
    """A smooth colour gradient as a JPEG: a warm-up image when no real one is given."""
    height, width = size
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack(
        [
            255 * x / max(width - 1, 1),
            255 * y / max(height - 1, 1),
            np.full((height, width), 128.0),
        ],
        axis=-1,
    )
    return tf.io.encode_jpeg(pixels.astype("uint8")).numpy()
