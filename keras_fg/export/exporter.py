"""One call that writes every export of a model, its parity report, and nothing half-written."""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from keras_fg.export.errors import ExportInputError, require_tensorflow_backend
from keras_fg.export.int8 import INT8_OPTIONS, int8_refusal
from keras_fg.export.parity import CHECKS, check_parity, model_outputs
from keras_fg.export.preprocess import RESIZE_RULE, encode_images, load_images, synthetic_images
from keras_fg.export.saved_model import WARMUP_FILE, export_saved_model
from keras_fg.export.tflite import LABELS_FILE, export_tflite

FORMATS = (
    "saved_model",
    "tflite_fp32",
    "tflite_fp16",
    "tflite_dynamic",
    "tflite_int8",
    "tflite_int16x8",
)
# int16 activations run on reference kernels, several times slower than float on a CPU: an
# option for accuracy, not a default.
DEFAULT_FORMATS = FORMATS[:-1]
MAX_IMAGES = 200  # Evaluation images read from a folder, at most.
CALIBRATION_IMAGES = 300  # Calibration images read from a folder, at most.
SYNTHETIC_IMAGES = 32
REPORT = "report.json"


def export_model(
    model,
    output_dir,
    formats=DEFAULT_FORMATS,
    calibration_data=None,
    evaluation_data=None,
    version=1,
    model_name=None,
    top_k=5,
    model_file=None,
    max_images=MAX_IMAGES,
    calibration_images=CALIBRATION_IMAGES,
    class_names=None,
    int8_float_layers=None,
    int8_float_stem=None,
    int8_float_head=None,
    int8_head_weights=None,
    run=None,
):
    """Exports `model` to every requested format, checks each against Keras, writes a report.

    Layout of `output_dir`:

        saved_model/<model_name>/<version>/     the SavedModel (TF Serving's layout), with
                                                its warm-up requests in assets.extra/
        <model_name>_<fp32|fp16|dynamic|int8|int16x8>.tflite   with labels.txt inside
        report.json                             sizes, latencies, parity, op sets

    Everything is written into a temporary directory inside `output_dir` and renamed into
    place at the end, so a failed export leaves nothing behind and TF Serving, which watches
    `saved_model/<model_name>/`, never sees a half-written version. Earlier versions stay;
    the `.tflite` files and `report.json` are replaced by this version's.

    Parity is measured on the images of `evaluation_data` (at most `max_images`, spread over
    the folder); without it, on synthetic images (stated in the report). Full-integer int8
    and 16x8 are calibrated on `calibration_data` (at most `calibration_images`), else on
    the evaluation images; with neither they are skipped, with the reason in the report,
    since calibrating on synthetic images would give a model of unknown accuracy.

    Every `.tflite` file carries the class names as its associated file `labels.txt`
    (`keras_fg.export.tflite.write_labels`), when the model or `class_names` has them.

    Args:
        model: a keras_fg model.
        output_dir: the export directory (created if needed).
        formats: any of `FORMATS` (default `DEFAULT_FORMATS`: all but `tflite_int16x8`).
        calibration_data: a folder of training images (any nesting), a list of image
            files, or uint8 images `(N, height, width, 3)`, for int8 calibration (a list
            or an array is used whole).
        evaluation_data: a folder of real images (any nesting), a list of image files, or
            uint8 images `(N, height, width, 3)`, for the parity checks (a list or an
            array is used whole).
        version: the SavedModel version, an integer >= 1.
        model_name: the name in paths; default `model.name`.
        top_k: the SavedModel's top-k outputs.
        model_file: the `.keras` file the model came from, recorded in the report.
        max_images: at most this many evaluation images are read from a folder.
        calibration_images: at most this many calibration images are read from a folder.
        class_names: the class names; default `model.class_names`.
        int8_float_layers: full-integer int8 keeps in float this many of the layers whose
            int8 weights move the logits most (default: `int8.INT8_FLOAT_LAYERS`).
        int8_float_stem: full-integer int8 keeps in float the model's first this many
            dense or convolution layers (default: `int8.INT8_FLOAT_STEM`).
        int8_float_head: full-integer int8 keeps in float every op after the model's
            backbone (default: `int8.INT8_FLOAT_HEAD`).
        int8_head_weights: full-integer int8 gives the float head's dense and convolution
            layers and constant matrix products int8 weights, run as hybrid kernels
            (default: `int8.INT8_HEAD_WEIGHTS`).
        run: what a train.py run directory gave (recorded in the report).

    Returns:
        The report (also written to `output_dir/report.json`).

    Raises:
        ExportInputError: an unknown format, a bad name, version or folder, or a
            `output_dir` that already holds this version of the model.
        ExportError: a conversion failed or produced an op that is not a TFLite builtin.

    Example:

    >>> report = export_model(model, "exports", evaluation_data="data/birds/test")
    >>> [(e["format"], e["check"]["passed"]) for e in report["exports"]]
    """
    require_tensorflow_backend()
    formats = parse_formats(formats)
    name = model_name or model.name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ExportInputError(f"Model name {name!r} must be letters, digits, '_', '.', '-'.")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ExportInputError(f"Version must be an integer >= 1. Received: version={version!r}")
    if not isinstance(getattr(model, "output", None), dict) or "probabilities" not in model.output:
        raise ExportInputError(
            "The model must output a dict with 'probabilities' (a keras_fg model)."
        )
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise ExportInputError(f"Output {output} exists and is not a directory.")
    _refuse_existing_version(output, name, version)

    size = tuple(model.input_shape[1:3])
    class_names = class_names or getattr(model, "class_names", None)
    num_classes = int(model.output["probabilities"].shape[-1])
    if class_names is not None and len(class_names) != num_classes:
        raise ExportInputError(
            f"The model has {num_classes} classes but {len(class_names)} class names were "
            f"given. Received: class_names={list(class_names)[:5]}..."
        )
    if evaluation_data is not None:
        evaluation = _read_images(evaluation_data, size, max_images, "Evaluation")
    else:
        evaluation = {
            **synthetic_images(size, SYNTHETIC_IMAGES),
            "source": "synthetic",
            "note": "no evaluation folder given: parity measured on synthetic images "
            "(smooth random colour fields), not on real ones",
        }
    calibration = None
    if calibration_data is not None:
        calibration = _read_images(calibration_data, size, calibration_images, "Calibration")
    elif evaluation_data is not None:
        calibration = {**evaluation, "note": "no calibration folder given: the evaluation images"}

    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=output))
    try:
        settings = {
            "name": name,
            "version": version,
            "top_k": top_k,
            "class_names": class_names,
            "int8_float_layers": int8_float_layers,
            "int8_float_stem": int8_float_stem,
            "int8_float_head": int8_float_head,
            "int8_head_weights": int8_head_weights,
        }
        evaluation["reference"] = model_outputs(model, evaluation["images"])
        entries = [
            _export_one(model, fmt, staging, settings, evaluation, calibration) for fmt in formats
        ]
        report = {
            "model": {
                "file": None if model_file is None else os.path.abspath(model_file),
                "name": name,
                "class": type(model).__name__,
                "num_classes": num_classes,
                "class_names": class_names,
                "input_shape": list(model.input_shape[1:]),
                "outputs": sorted(model.output),
            },
            "run": run,
            "version": version,
            "top_k": top_k,
            "preprocessing": RESIZE_RULE,
            "evaluation_data": _describe(evaluation),
            "calibration_data": None if calibration is None else _describe(calibration),
            "checks": {variant: {"metric": m, "bound": b} for variant, (m, b) in CHECKS.items()},
            "exports": entries,
            "passed": all(e["check"]["passed"] for e in entries if "check" in e),
        }
        with open(staging / REPORT, "w") as file:
            json.dump(report, file, indent=2)
        # The SavedModel version last: its appearance tells TF Serving the export is complete.
        written = [e["file"] for e in entries if e.get("file") and e["format"] != "saved_model"]
        written += [REPORT] + [e["file"] for e in entries if e["format"] == "saved_model"]
        for relative in written:
            (output / relative).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / relative, output / relative)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(output, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return report


def parse_formats(formats):
    """A tuple of format names from a sequence or a comma-separated string; unknown ones raise."""
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        problem = f"Unknown export format {unknown[0]!r}" if unknown else "No export format given"
        raise ExportInputError(f"{problem}; valid formats: {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(formats))


def format_table(report):
    """The report as a console table, one row per exported file."""
    evaluation = report["evaluation_data"]
    lines = [
        f"{report['model']['name']} version {report['version']}: parity on "
        f"{evaluation['images']} {_kind(evaluation)}images" + _origin(report),
        f"{'file':<40} {'size':>10} {'latency':>10} {'max|dp|':>10} {'top-1':>7}  check",
    ]
    for entry in report["exports"]:
        if "skipped" in entry:
            lines.append(f"{entry['format']:<40} skipped: {entry['skipped']}")
            continue
        check = entry["check"]
        if check["metric"] == "max_abs_diff":
            rule = f"max|dp| <= {check['bound']:g}"
            shortfall = _number(check["shortfall"], "{:.2e}")
        else:
            rule = f"top-1 >= {100 * check['bound']:g}%"
            points = None if check["shortfall"] is None else 100 * check["shortfall"]
            shortfall = _number(points, "{:.1f} points")
        if check["passed"]:
            verdict = "PASS"
        elif entry.get("error"):
            verdict = f"FAIL ({entry['error']})"
        elif check["value"] is None:
            verdict = "FAIL (non-finite probabilities)"
        else:
            verdict = f"FAIL (short by {shortfall})"
        lines.append(
            f"{entry['file']:<40} {_size(entry['size_bytes']):>10} "
            f"{_number(entry['latency_ms'], '{:.2f}ms'):>10} "
            f"{_number(entry['max_abs_diff'], '{:.2e}'):>10} "
            f"{_number(entry['top1_agreement'], '{:.1%}'):>7}  "
            f"{verdict} [{rule}]"
        )
    return "\n".join(lines)


def _kind(evaluation):
    """The word before "images": the source, none for an array of pixels."""
    return "" if evaluation["source"] == "array" else f"{evaluation['source']} "


def _origin(report):
    """Where the parity images came from, for the table's first line."""
    evaluation, run = report["evaluation_data"], report.get("run") or {}
    if evaluation.get("path"):
        return f" from {evaluation['path']}"
    if evaluation["source"] == "synthetic":
        return " (no --evaluation-data)"
    data = run.get("data") or {}
    split = f", {data['evaluation_split']} split" if data.get("evaluation_split") else ""
    return f" (the run's {data.get('format', 'own')} data{split})"


def _number(value, template):
    return "n/a" if value is None else template.format(value)


def _export_one(model, fmt, staging, settings, evaluation, calibration):
    entry = {"format": fmt}
    name = settings["name"]
    if fmt == "saved_model":
        relative = f"saved_model/{name}/{settings['version']}"
        real = evaluation["source"] != "synthetic"
        entry["signatures"] = export_saved_model(
            model,
            staging / relative,
            top_k=settings["top_k"],
            class_names=settings["class_names"],
            warmup_image=evaluation["encoded"][0] if real else None,
            model_name=name,
        )
        entry["warmup_requests"] = WARMUP_FILE
    else:
        quantization = fmt.split("_", 1)[1]
        refusal = int8_refusal(model) if quantization == "int8" else None
        if refusal:
            return {**entry, "file": None, "skipped": refusal}
        if quantization in ("int8", "int16x8") and calibration is None:
            return {
                **entry,
                "file": None,
                "skipped": f"{quantization} needs calibration images: pass a run directory, "
                "--calibration-data or --evaluation-data",
            }
        relative = f"{name}_{quantization}.tflite"
        options = {}
        for option in INT8_OPTIONS:
            if quantization == "int8" and settings[option] is not None:
                options[option] = settings[option]
        details = export_tflite(
            model,
            staging / relative,
            quantization,
            representative_images=None if calibration is None else calibration["images"],
            class_names=settings["class_names"],
            return_details=True,
            **options,
        )
        entry.update(details)
        entry["labels"] = LABELS_FILE if settings["class_names"] else None
    entry["file"] = relative
    # The SavedModel decodes the encoded images itself; TFLite files get the decoded pixels.
    images = evaluation["encoded"] if fmt == "saved_model" else evaluation["images"]
    parity = check_parity(
        model, staging / relative, images, variant=fmt, reference=evaluation["reference"]
    )
    entry.update({key: value for key, value in parity.items() if key != "variant"})
    return entry


def _refuse_existing_version(output, name, version):
    if (output / "saved_model" / name / str(version)).exists():
        raise ExportInputError(
            f"Output directory {output} already holds version {version} of {name!r} "
            f"({output / 'saved_model' / name / str(version)}); "
            "choose another --version or --output."
        )
    report = output / REPORT
    if report.is_file():
        try:
            with open(report) as file:
                previous = json.load(file)
            same = previous["model"]["name"] == name and previous["version"] == version
        except (ValueError, KeyError, TypeError):
            same = False
        if same:
            raise ExportInputError(
                f"Output directory {output} already holds version {version} of {name!r} "
                f"({report}); choose another --version or --output."
            )


def _read_images(source, size, max_images, role):
    """A folder (at most `max_images`, spread over it), a list of image files (all), or
    an array of uint8 images (all)."""
    if isinstance(source, np.ndarray):
        if source.ndim != 4 or source.shape[-1] != 3 or not len(source):
            raise ExportInputError(
                f"{role} images must be a non-empty array (N, height, width, 3). "
                f"Received: shape={source.shape}"
            )
        return {**encode_images(source, size), "source": "array"}
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isdir(source):
            raise ExportInputError(f"{role} data folder not found: {source}")
        images = load_images(source, size, max_images)
        if not len(images["images"]):
            raise ExportInputError(f"{role} data folder {source} holds no readable images.")
        return {**images, "source": "folder", "path": os.path.abspath(source)}
    paths = [os.fspath(path) for path in source]
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise ExportInputError(f"{role} image not found: {missing[0]}")
    images = load_images(paths, size)
    if not len(images["images"]):
        raise ExportInputError(f"None of the {len(paths)} {role.lower()} images is readable.")
    common = os.path.commonpath([os.path.abspath(path) for path in paths])
    return {**images, "source": "files", "path": common}


def _describe(images):
    description = {"source": images["source"], "images": len(images["images"])}
    for key in ("path", "note"):
        if images.get(key):
            description[key] = images[key]
    if images.get("skipped"):
        description["unreadable_files"] = images["skipped"]
    return description


def _size(size_bytes):
    for unit in ("B", "KB", "MB"):
        if size_bytes < 1024 or unit == "MB":
            return f"{size_bytes:.0f} {unit}" if unit == "B" else f"{size_bytes:.1f} {unit}"
        size_bytes /= 1024
