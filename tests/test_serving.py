"""TF Serving's side of the SavedModel: warm-up records, the REST JSON bodies and a gRPC
PredictRequest, answered in a process that cannot import keras_fg."""

import base64
import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from keras_fg.export import decode_and_resize, export_model
from keras_fg.export.saved_model import WARMUP_FILE
from keras_fg.models import create_model

SIZE = 32
CLASS_NAMES = ["albatross", "ani", "auklet"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An MA-CNN (tiny backbone) exported with export_model, and three JPEGs."""
    folder = tmp_path_factory.mktemp("serving")
    rng = np.random.default_rng(0)
    images = folder / "images"
    images.mkdir()
    jpegs = []
    for index in range(3):
        pixels = rng.integers(0, 256, (40 + 4 * index, 36, 3)).astype("uint8")
        jpegs.append(tf.io.encode_jpeg(pixels).numpy())
        (images / f"{index}.jpg").write_bytes(jpegs[-1])
    keras.utils.set_random_seed(0)
    model = create_model(
        "macnn", 3, backbone="tiny", image_size=SIZE, num_parts=2, class_names=CLASS_NAMES
    )
    export_model(
        model, folder / "exports", formats=("saved_model",), evaluation_data=images,
        model_name="birds", top_k=2,
    )  # fmt: skip
    pixels = np.stack([decode_and_resize(data, SIZE).numpy() for data in jpegs])
    expected = model.predict(pixels, verbose=0)
    return folder / "exports" / "saved_model" / "birds" / "1", jpegs, expected


def test_warmup_records_are_prediction_logs_for_both_signatures(exported):
    directory, jpegs, _ = exported
    records = [
        prediction_log_pb2.PredictionLog.FromString(record.numpy())
        for record in tf.data.TFRecordDataset(str(directory / WARMUP_FILE))
    ]
    requests = {log.predict_log.request.model_spec.signature_name: log.predict_log.request
                for log in records}  # fmt: skip
    assert len(records) == 2 and set(requests) == {"serving_default", "predict_images"}
    assert {r.model_spec.name for r in requests.values()} == {"birds"}
    # The warm-up image is the first evaluation image: real bytes, and its decoded pixels.
    image_bytes = tf.make_ndarray(requests["serving_default"].inputs["image_bytes"])
    assert image_bytes.tolist() == [jpegs[0]]
    pixels = tf.make_ndarray(requests["predict_images"].inputs["images"])
    np.testing.assert_array_equal(pixels, decode_and_resize(jpegs[0], SIZE).numpy()[None])


# The server's side, in a process whose sys.path holds neither the project nor an installed
# keras_fg. REST bodies are decoded as TF Serving decodes them: a JSON object {"b64": s} is the
# bytes of base64 s; in "instances" (row format) each instance is a dict of named inputs or, for
# a signature with one input, the input's value; in "inputs" (columnar) a dict of named inputs or,
# for one input, its value. The answer is {"predictions": [...]} or {"outputs": {...}}.
SERVER = """
    import importlib.util, json, os, sys
    sys.path = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "keras_fg"))]
    sys.meta_path = [f for f in sys.meta_path  # An editable install's finder, for one.
                     if not (hasattr(f, "find_spec") and f.find_spec("keras_fg", None))]
    assert importlib.util.find_spec("keras_fg") is None, "keras_fg is importable"
    import base64
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    directory, work = sys.argv[1], sys.argv[2]
    loaded = tf.saved_model.load(directory)

    def b64(value):
        if isinstance(value, dict) and set(value) == {"b64"}:
            return base64.b64decode(value["b64"])
        return [b64(v) for v in value] if isinstance(value, list) else value

    def rest(body):
        signature = loaded.signatures[body.get("signature_name", "serving_default")]
        names = list(signature.structured_input_signature[1])
        if "instances" in body:
            columns = {name: [] for name in names}
            for row in body["instances"]:
                named = isinstance(row, dict) and set(row) != {"b64"}
                for name in names:
                    columns[name].append(b64(row[name] if named else row))
            out = {k: v.numpy() for k, v in signature(**{
                k: tf.constant(v) for k, v in columns.items()}).items()}
            return {"predictions": [{k: as_json(v[i]) for k, v in out.items()}
                                    for i in range(len(body["instances"]))]}
        inputs = body["inputs"]
        if not isinstance(inputs, dict) or set(inputs) == {"b64"}:
            inputs = {names[0]: inputs}
        out = signature(**{k: tf.constant(b64(v)) for k, v in inputs.items()})
        return {"outputs": {k: as_json(v.numpy()) for k, v in out.items()}}

    def as_json(array):
        array = np.asarray(array)
        return array.astype(str).tolist() if array.dtype.kind in "SO" else array.tolist()

    def grpc(request):
        signature = loaded.signatures[request.model_spec.signature_name or "serving_default"]
        out = signature(**{k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()})
        response = predict_pb2.PredictResponse()
        response.model_spec.CopyFrom(request.model_spec)
        for k, v in out.items():
            response.outputs[k].CopyFrom(tf.make_tensor_proto(v.numpy()))
        return response

    warmed = []
    warmup = os.path.join(directory, "assets.extra", "tf_serving_warmup_requests")
    for record in tf.data.TFRecordDataset(warmup):
        request = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
        warmed.append([request.model_spec.signature_name, sorted(grpc(request).outputs)])
    answers = {}
    for name in ("instances", "instances_named", "inputs", "inputs_named"):
        with open(os.path.join(work, name + ".json")) as file:
            answers[name] = rest(json.load(file))
    with open(os.path.join(work, "request.pb"), "rb") as file:
        response = grpc(predict_pb2.PredictRequest.FromString(file.read()))
    with open(os.path.join(work, "response.pb"), "wb") as file:
        file.write(response.SerializeToString())
    print(json.dumps({"rest": answers, "warmed": warmed,
                      "keras_fg_imported": "keras_fg" in sys.modules}))
"""


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory):
    directory, jpegs, _ = exported
    work = tmp_path_factory.mktemp("requests")
    encoded = [{"b64": base64.b64encode(data).decode("ascii")} for data in jpegs]
    bodies = {
        "instances": {"instances": encoded},
        "instances_named": {"signature_name": "serving_default",
                            "instances": [{"image_bytes": value} for value in encoded]},
        "inputs": {"inputs": encoded},
        "inputs_named": {"signature_name": "serving_default", "inputs": {"image_bytes": encoded}},
    }  # fmt: skip
    for name, body in bodies.items():
        (work / f"{name}.json").write_text(json.dumps(body))
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name="birds", signature_name="serving_default")
    )
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(jpegs, dtype=tf.string))
    (work / "request.pb").write_bytes(request.SerializeToString())
    result = subprocess.run(
        [sys.executable, "-I", "-c", textwrap.dedent(SERVER), str(directory), str(work)],
        capture_output=True, text=True, timeout=900, cwd=work,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    response = predict_pb2.PredictResponse.FromString((work / "response.pb").read_bytes())
    return answer, response


def _check(outputs, expected):
    """Outputs (a dict of arrays over the batch) against the Keras model's answer."""
    probabilities = np.asarray(outputs["probabilities"], "float32")
    np.testing.assert_allclose(probabilities, expected["probabilities"], atol=1e-5)
    np.testing.assert_allclose(outputs["attention_maps"], expected["attention_maps"], atol=1e-5)
    np.testing.assert_allclose(outputs["features"], expected["features"], atol=1e-4)
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :2]
    np.testing.assert_array_equal(outputs["top_k_indices"], order)
    assert np.asarray(outputs["top_k_class_names"]).tolist() == (
        np.array(CLASS_NAMES)[order].tolist()
    )


def test_server_process_cannot_import_keras_fg_and_replays_the_warmup(served):
    answer, _ = served
    assert answer["keras_fg_imported"] is False
    assert sorted(name for name, _ in answer["warmed"]) == ["predict_images", "serving_default"]
    assert all("probabilities" in outputs for _, outputs in answer["warmed"])


@pytest.mark.parametrize("body", ["instances", "instances_named"])
def test_rest_row_format_with_b64_gives_the_keras_answer(served, exported, body):
    predictions = served[0]["rest"][body]["predictions"]
    assert len(predictions) == 3
    _check({k: [p[k] for p in predictions] for k in predictions[0]}, exported[2])


@pytest.mark.parametrize("body", ["inputs", "inputs_named"])
def test_rest_columnar_format_with_b64_gives_the_keras_answer(served, exported, body):
    _check(served[0]["rest"][body]["outputs"], exported[2])


def test_grpc_predict_request_gives_the_keras_answer(served, exported):
    response = served[1]
    assert response.model_spec.signature_name == "serving_default"
    outputs = {name: tf.make_ndarray(tensor) for name, tensor in response.outputs.items()}
    outputs["top_k_class_names"] = outputs["top_k_class_names"].astype(str)
    _check(outputs, exported[2])
