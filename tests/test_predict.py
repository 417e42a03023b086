"""predict.py: the same answers from a .keras file, its SavedModel and its TFLite file; JSON,
attention overlays, unreadable files, unknown class names, gallery rankings, a gallery index
built, extended and searched, bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_fg.cli.predict import main
from keras_fg.export import decode_and_resize, export_model
from keras_fg.models import create_model

ROOT = Path(__file__).resolve().parents[1]
SIZE = 48
CLASSES = 4
EXPORT_TOLERANCE = 1e-4  # The float32 parity bound of keras_fg.export (CHECKS).


def predict(capsys, *args):
    """Runs predict.py in-process: (exit status, stdout, stderr)."""
    status = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def predict_json(capsys, *args):
    status, out, err = predict(capsys, *args, "--json")
    assert status == 0, err
    return json.loads(out), err


@pytest.fixture(scope="module")
def images(request, tmp_path_factory):
    """Training images and a nested folder of 8 held-out ones (2 per class): real CUB birds
    from ../shared, else coloured synthetic JPEGs."""
    folder = tmp_path_factory.mktemp("images")
    try:
        cub = request.getfixturevalue("cub_dir")
        classes = sorted((cub / "images").iterdir())[:CLASSES]
        files = [sorted(c.glob("*.jpg"))[:18] for c in classes]
        encoded = [[path.read_bytes() for path in class_files] for class_files in files]
        names = [c.name for c in classes]
    except pytest.skip.Exception:
        rng = np.random.default_rng(0)
        colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])
        noise = rng.normal(0, 30, (CLASSES, 18, 60, 50, 3))
        pixels = np.clip(colours[:, None, None, None] + noise, 0, 255)
        encoded = [[tf.io.encode_jpeg(p.astype("uint8")).numpy() for p in c] for c in pixels]
        names = ["red", "green", "blue", "yellow"]
    train = np.stack([decode_and_resize(data, SIZE).numpy() for c in encoded for data in c[:16]])
    labels = np.repeat(np.arange(CLASSES), 16)
    for name, class_encoded in zip(names, encoded):
        (folder / name).mkdir()
        for index, data in enumerate(class_encoded[16:]):
            (folder / name / f"{index}.jpg").write_bytes(data)
    return {"train": train, "labels": labels, "class_names": names, "folder": folder}


@pytest.fixture(scope="module")
def forms(images, tmp_path_factory):
    """An MA-CNN (tiny backbone) trained a few steps, as .keras, SavedModel and .tflite."""
    folder = tmp_path_factory.mktemp("model")
    keras.utils.set_random_seed(0)
    model = create_model(
        "macnn",
        CLASSES,
        backbone="tiny",
        image_size=SIZE,
        num_parts=2,
        class_names=images["class_names"],
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    model.fit(images["train"], images["labels"], batch_size=16, epochs=4, verbose=0)
    model.save(folder / "model.keras")
    export_model(
        model,
        folder / "exports",
        formats=("saved_model", "tflite_fp32"),
        evaluation_data=images["folder"],
        model_name="birds",
    )
    return {
        "keras": folder / "model.keras",
        # The TF Serving base directory: predict.py takes its highest version.
        "saved_model": folder / "exports" / "saved_model" / "birds",
        "tflite": folder / "exports" / "birds_fp32.tflite",
    }


def test_every_form_gives_the_same_top_classes(forms, images, capsys):
    results = {
        form: predict_json(capsys, path, images["folder"])[0] for form, path in forms.items()
    }
    reference = results["keras"]
    assert len(reference["predictions"]) == 2 * CLASSES
    for form, result in results.items():
        assert result["form"] == form
        assert result["image_size"] == [SIZE, SIZE]
        assert [p["image"] for p in result["predictions"]] == [
            p["image"] for p in reference["predictions"]
        ]
        for prediction, expected in zip(result["predictions"], reference["predictions"]):
            top, expected_top = prediction["top_k"][0], expected["top_k"][0]
            assert top["index"] == expected_top["index"], (form, prediction["image"])
            # Class names: the .keras model's own, the labels inside the others.
            assert top["class"] == images["class_names"][top["index"]]
            np.testing.assert_allclose(
                [guess["probability"] for guess in prediction["top_k"]],
                [guess["probability"] for guess in expected["top_k"]],
                atol=EXPORT_TOLERANCE,
            )


def test_json_schema_and_attention_overlays(forms, images, tmp_path, capsys):
    output = tmp_path / "out"
    result, _ = predict_json(
        capsys, forms["keras"], images["folder"], "--top-k", 3, "--output", output
    )
    assert set(result) == {
        "model",
        "form",
        "image_size",
        "task",
        "top_k",
        "predictions",
        "skipped",
        "output",
    }
    assert (result["task"], result["top_k"], result["skipped"]) == ("classification", 3, [])
    assert json.loads((output / "predictions.json").read_text()) == result
    for prediction in result["predictions"]:
        assert set(prediction) == {"image", "top_k", "attention_overlay"}
        assert Path(prediction["image"]).is_file()
        assert len(prediction["top_k"]) == 3
        for guess in prediction["top_k"]:
            assert set(guess) == {"index", "class", "probability"}
        probabilities = [guess["probability"] for guess in prediction["top_k"]]
        assert probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-6
        assert all(isinstance(guess["index"], int) for guess in prediction["top_k"])
        assert Path(prediction["attention_overlay"]).parent == output
    # One overlay per image, named after its path under the folder (class/0.jpg -> class__0).
    overlays = sorted(p.name for p in output.glob("*_attention.png"))
    assert overlays == sorted(
        f"{name}__{index}_attention.png" for name in images["class_names"] for index in (0, 1)
    )
    figure = keras.utils.img_to_array(keras.utils.load_img(output / overlays[0]))
    assert figure.shape[1] > 2 * figure.shape[0]  # The image and its two part overlays.


def test_table_and_unreadable_file_skipped_by_name(forms, images, tmp_path, capsys):
    folder = tmp_path / "mixed"
    shutil.copytree(images["folder"] / images["class_names"][0], folder)
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not an image either, and not named like one")
    status, out, err = predict(capsys, forms["tflite"], folder, "--top-k", 2)
    assert status == 0
    assert f"skipped unreadable image {folder / 'broken.jpg'}: Unknown image file format" in err
    lines = out.splitlines()
    assert lines[0].split() == ["image", "rank", "class", "probability"]
    assert len(lines) == 1 + 2 * 2 + 1  # Header, 2 images x 2 classes, the skipped line.
    assert lines[-1] == f"skipped 1 unreadable file(s): {folder / 'broken.jpg'}"
    assert "notes.txt" not in out + err

    (folder / "0.jpg").write_bytes(b"")
    (folder / "1.jpg").write_bytes(b"\xff\xd8\xff truncated")
    status, out, err = predict(capsys, forms["tflite"], folder)
    assert status == 2 and out == ""
    assert err.splitlines()[-1].startswith(
        "predict.py: error: no readable image among the 3 image file(s)"
    )


def test_tflite_alone_names_its_classes_from_the_labels_inside(forms, images, tmp_path, capsys):
    alone = tmp_path / "birds_fp32.tflite"  # Without the report.json beside it.
    shutil.copy(forms["tflite"], alone)
    result, _ = predict_json(capsys, alone, images["folder"])
    for prediction in result["predictions"]:
        for guess in prediction["top_k"]:
            assert guess["class"] == images["class_names"][guess["index"]]


def test_unknown_class_names_print_indices(forms, images, tmp_path, capsys):
    from keras_fg.export.tflite import read_labels

    bare = tmp_path / "birds_fp32.tflite"  # The flatbuffer alone: no labels, no report.json.
    data = forms["tflite"].read_bytes()
    bare.write_bytes(data[: data.rindex(b"PK\x03\x04")])
    assert read_labels(bare) is None
    result, _ = predict_json(capsys, bare, images["folder"])
    assert all(g["class"] is None for p in result["predictions"] for g in p["top_k"])
    status, out, _ = predict(capsys, bare, images["folder"], "--top-k", 1)
    assert status == 0
    first = result["predictions"][0]["top_k"][0]
    assert out.splitlines()[1].split()[1:3] == ["1", str(first["index"])]


def test_gallery_ranking_is_the_same_for_every_form(forms, market_dir, capsys):
    results = {
        form: predict_json(
            capsys,
            path,
            market_dir / "query",
            "--gallery",
            market_dir / "bounding_box_test",
            "--top-k",
            5,
        )[0]
        for form, path in forms.items()
    }
    for result in results.values():
        for query, expected in zip(result["queries"], results["keras"]["queries"]):
            assert query["ranking"][0]["image"] == expected["ranking"][0]["image"]
            np.testing.assert_allclose(
                [r["distance"] for r in query["ranking"]],
                [r["distance"] for r in expected["ranking"]],
                atol=EXPORT_TOLERANCE,
            )


def test_gallery_ranking_on_mini_market1501(market_dir, mobilenet_weights, tmp_path, capsys):
    """ImageNet MobileNetV2 features (../shared) under a BNNeck, cosine distance, whole gallery.

    Measured on mini_market1501 (32 queries, 32 gallery images of 16 people): the nearest
    gallery image is a true match for 13 of 32 queries (40.6 %; chance is about 6 %).
    """
    keras.utils.set_random_seed(0)
    model = create_model(
        "gap",
        16,
        backbone="mobilenetv2",
        weights=str(mobilenet_weights),
        image_size=(128, 64),
        bnneck=True,
    )
    model.save(tmp_path / "reid.keras")
    gallery = ["--gallery", market_dir / "bounding_box_test"]
    result, _ = predict_json(capsys, tmp_path / "reid.keras", market_dir / "query", *gallery)
    assert set(result) == {
        "model",
        "form",
        "image_size",
        "task",
        "metric",
        "gallery",
        "index",
        "index_type",
        "gallery_size",
        "top_k",
        "rank1",
        "queries_with_match",
        "queries",
        "timings",
        "skipped",
    }
    assert (result["task"], result["gallery_size"], result["top_k"]) == ("reid", 32, 10)
    assert (result["index"], result["index_type"]) == (None, "flat")  # --gallery: temporary.
    assert len(result["queries"]) == result["queries_with_match"] == 32
    assert result["rank1"] >= 0.3
    for query in result["queries"]:
        assert set(query) == {"image", "person_id", "camera", "first_match_rank", "ranking"}
        ranking = query["ranking"]
        assert [r["rank"] for r in ranking] == list(range(1, 11))
        distances = [r["distance"] for r in ranking]
        assert distances == sorted(distances)
        assert all(r["match"] == (r["person_id"] == query["person_id"]) for r in ranking)
        matches = [r["rank"] for r in ranking if r["match"]]
        if matches:
            assert query["first_match_rank"] == matches[0]
        else:
            assert query["first_match_rank"] > len(ranking)

    # Market-1501's query box and a gallery box of the same frame: an easy match, drawn.
    easy = market_dir / "query" / "0005_c1s1_001351_00.jpg"
    output = tmp_path / "rankings"
    result, _ = predict_json(capsys, tmp_path / "reid.keras", easy, *gallery, "--output", output)
    (query,) = result["queries"]
    assert (query["person_id"], query["camera"], query["first_match_rank"]) == (5, 1, 1)
    assert Path(query["ranking"][0]["image"]).name == "0005_c1s1_001351_02.jpg"
    assert query["ranking"][0]["match"] is True
    assert query["ranking_figure"] == str(output / "0005_c1s1_001351_00_ranking.png")
    figure = keras.utils.img_to_array(keras.utils.load_img(query["ranking_figure"]))
    assert figure.shape[1] > 8 * figure.shape[0]  # The query, then 10 ranked images in a row.


def test_index_build_add_and_search_answer_as_the_gallery_does(forms, market_dir, tmp_path, capsys):
    """--index DIR --build, then --add, then queries: the rankings of --gallery (one path)."""
    gallery = market_dir / "bounding_box_test"
    half = tmp_path / "half"
    half.mkdir()
    for path in sorted(gallery.glob("*.jpg"))[::2]:
        shutil.copy(path, half / path.name)
    index = tmp_path / "index"
    built, _ = predict_json(capsys, forms["keras"], "--index", index, "--build", half)
    assert (built["task"], built["added"], built["count"], built["structure"]) == (
        "index",
        16,
        16,
        "flat",
    )
    added, _ = predict_json(
        capsys, forms["keras"], "--index", index, "--build", gallery, "--add", "--threads", 1
    )
    # The files of half/ have other paths than gallery/'s: only paths already indexed are kept out.
    assert (added["added"], added["already_indexed"], added["count"]) == (32, 0, 48)
    again, _ = predict_json(capsys, forms["keras"], "--index", index, "--build", gallery, "--add")
    assert (again["added"], again["already_indexed"], again["count"]) == (0, 32, 48)

    status, out, err = predict(capsys, forms["keras"], "--index", index, "--build", half)
    assert status == 2 and "already holds a gallery index: pass --add" in err

    shutil.rmtree(index)
    predict_json(capsys, forms["keras"], "--index", index, "--build", gallery)
    output = tmp_path / "rankings"
    searched, _ = predict_json(
        capsys, forms["keras"], market_dir / "query", "--index", index, "--output", output
    )
    expected, _ = predict_json(capsys, forms["keras"], market_dir / "query", "--gallery", gallery)
    assert (searched["index"], searched["index_type"]) == (str(index), "flat")
    assert searched["rank1"] == expected["rank1"]
    for query, reference in zip(searched["queries"], expected["queries"]):
        assert query["first_match_rank"] == reference["first_match_rank"]
        assert [r["image"] for r in query["ranking"]] == [r["image"] for r in reference["ranking"]]
        np.testing.assert_allclose(
            [r["distance"] for r in query["ranking"]],
            [r["distance"] for r in reference["ranking"]],
            atol=1e-6,
        )
        assert Path(query["ranking_figure"]).is_file()
    status, table, _ = predict(capsys, forms["keras"], market_dir / "query", "--index", index)
    assert status == 0 and table.splitlines()[0].split() == [
        "query",
        "rank",
        "distance",
        "match",
        "gallery",
        "image",
    ]

    # Another model's embeddings are refused, in one line.
    other = tmp_path / "other.keras"
    keras.utils.set_random_seed(1)
    create_model("gap", CLASSES, backbone="tiny", image_size=SIZE).save(other)
    status, out, err = predict(capsys, other, market_dir / "query", "--index", index)
    assert status == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("predict.py: error: Model fingerprint mismatch: the index was built")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--build", "GALLERY"], "--build needs --index DIR"),
        (["QUERY", "--index", "INDEX", "--gallery", "GALLERY"], "--gallery and --index exclude"),
        (["QUERY", "--index", "INDEX/absent"], "no gallery index in"),
        (["--index", "INDEX", "--build", "GALLERY", "--add", "--nprobe", "0"], "--nprobe must"),
        (["QUERY", "--add"], "--add needs --build FOLDER"),
        ([], "an image or folder to predict is needed"),
    ],
)
def test_bad_search_options_are_one_line(flags, message, forms, market_dir, tmp_path, capsys):
    names = {
        "GALLERY": market_dir / "bounding_box_test",
        "QUERY": market_dir / "query",
        "INDEX": tmp_path,
    }
    flags = [
        str(names[flag.split("/")[0]]) + flag[len(flag.split("/")[0]) :]
        if flag.split("/")[0] in names
        else flag
        for flag in flags
    ]
    status, out, err = predict(capsys, forms["keras"], *flags)
    assert status == 2 and out == ""
    assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_model", "Model not found:"),
        ("missing_images", "Image path not found:"),
        ("missing_gallery", "Gallery path not found:"),
        ("unknown_file", "Unknown model form:"),
        ("empty_directory", "Unknown model form:"),
        ("corrupt_keras", "Cannot load keras model"),
        ("no_images", "holds no images"),
        ("top_k", "--top-k must be >= 1"),
        ("output_is_a_file", "exists and is not a directory"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(case, message, images, tmp_path, capsys):
    model, image_path, extra = tmp_path / "model.keras", images["folder"], []
    model.write_bytes(b"not a zip")
    if case == "missing_model":
        model = tmp_path / "absent.keras"
    elif case == "missing_images":
        image_path = tmp_path / "absent"
    elif case == "missing_gallery":
        extra = ["--gallery", tmp_path / "absent"]
    elif case == "unknown_file":
        model = tmp_path / "model.onnx"
        model.write_bytes(b"")
    elif case == "empty_directory":
        model = tmp_path / "empty"
        model.mkdir()
    elif case == "no_images":
        image_path = tmp_path / "empty"
        image_path.mkdir()
    elif case == "top_k":
        extra = ["--top-k", 0]
    elif case == "output_is_a_file":
        extra = ["--output", model]
    status, out, err = predict(capsys, model, image_path, *extra)
    assert status == 2 and out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith("predict.py: error: ") and message in err


def test_command_line_exit_status(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), str(tmp_path / "absent.keras"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert completed.returncode == 2
    assert f"predict.py: error: Model not found: {tmp_path / 'absent.keras'}" in completed.stderr
