"""`python export.py MODEL.keras|RUN_DIR --output DIR`: SavedModel and TFLite files, checked,
reported."""

import argparse
import os
import sys

from keras_fg.export.errors import ExportError, ExportInputError
from keras_fg.export.exporter import (
    CALIBRATION_IMAGES,
    DEFAULT_FORMATS,
    FORMATS,
    MAX_IMAGES,
    export_model,
    format_table,
    parse_formats,
)
from keras_fg.export.int8 import INT8_FLOAT_LAYERS, INT8_FLOAT_STEM, INT8_OPTIONS
from keras_fg.export.run_directory import is_run_directory, read_run_directory

FLOAT32_FORMATS = ("saved_model", "tflite_fp32")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="export.py",
        description="Export a trained keras_fg model to a SavedModel for TF Serving and to "
        "TFLite files for the edge, and check each against the Keras model.",
        epilog="Writes DIR/saved_model/<model-name>/<version>/, DIR/<model-name>_<variant>.tflite "
        "and DIR/report.json. Exit status: 0 when every file is written and the float32 "
        "exports match Keras; 1 when an export fails or a float32 export misses its bound "
        "(files are written, the report says by how much); 2 on bad input. A quantized file "
        "that misses its bound is reported, not fatal, unless --strict.",
    )
    parser.add_argument(
        "model",
        help="the trained model: a .keras file, or a train.py run directory (e.g. runs/latest), "
        "whose config.json names the dataset that calibrates and checks the exports",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="the export directory")
    parser.add_argument(
        "--formats",
        default=",".join(DEFAULT_FORMATS),
        help=f"comma-separated, any of: {', '.join(FORMATS)} "
        f"(default: {','.join(DEFAULT_FORMATS)})",
    )
    data = parser.add_argument_group("images")
    data.add_argument(
        "--calibration-data",
        metavar="DIR",
        help=f"a folder of training images (any nesting) to calibrate int8, at most "
        f"{CALIBRATION_IMAGES} spread over it (default: a run directory's training split, "
        f"{CALIBRATION_IMAGES} images, every class; else the evaluation images; without "
        "either, int8 is skipped)",
    )
    data.add_argument(
        "--evaluation-data",
        metavar="DIR",
        help=f"a folder of real images (any nesting) for the parity checks, at most {MAX_IMAGES} "
        "(default: a run directory's evaluation split; else synthetic images, stated in the "
        "report)",
    )
    data.add_argument(
        "--int8-float-layers",
        type=int,
        default=None,
        metavar="N",
        help="full-integer int8 keeps in float the N layers whose int8 weights move the "
        f"logits most (default: {INT8_FLOAT_LAYERS}, see docs/deployment.md)",
    )
    data.add_argument(
        "--int8-float-stem",
        type=int,
        default=None,
        metavar="N",
        help="full-integer int8 keeps in float the model's first N dense or convolution "
        f"layers, which read the image (default: {INT8_FLOAT_STEM}, see docs/deployment.md)",
    )
    data.add_argument(
        "--int8-float-head",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="full-integer int8 keeps in float every op after the backbone: the head, which "
        "reads the feature map (default: on, see docs/deployment.md)",
    )
    data.add_argument(
        "--int8-head-weights",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="full-integer int8 gives the float head's dense and convolution layers and "
        "constant matrix products int8 weights, run as hybrid kernels (default: on, see "
        "docs/deployment.md)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when any file misses its parity bound, quantized ones too (for a "
        "pipeline that must not ship a degraded file)",
    )
    serving = parser.add_argument_group("serving")
    serving.add_argument("--version", type=int, default=1, help="SavedModel version (default: 1)")
    serving.add_argument("--model-name", help="name in the paths (default: the model's name)")
    serving.add_argument(
        "--top-k", type=int, default=5, help="classes in the SavedModel's top-k (default: 5)"
    )
    return parser


def load_model(path):
    """Loads a `.keras` model file; a missing or unreadable file raises `ExportInputError`."""
    if not os.path.isfile(path):
        raise ExportInputError(f"Model file not found: {path}")
    import keras

    import keras_fg.models  # noqa: F401  (registers the model classes for deserialization)

    try:
        return keras.saving.load_model(path)
    except Exception as error:  # Keras raises ValueError, OSError, zipfile errors, ...
        lines = [line for line in str(error).splitlines() if line.strip()]
        reason = lines[0] if lines else type(error).__name__
        raise ExportInputError(f"Cannot load model file {path}: {reason[:200]}") from error


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        formats = parse_formats(args.formats)
        if args.top_k < 1:
            raise ExportInputError(f"--top-k must be >= 1. Received: {args.top_k}")
        for flag in ("--int8-float-layers", "--int8-float-stem"):
            value = getattr(args, flag[2:].replace("-", "_"))
            if value is not None and value < 0:
                raise ExportInputError(f"{flag} must be >= 0. Received: {value}")
        model_file, calibration, evaluation, class_names, run = args.model, None, None, None, None
        if is_run_directory(args.model):
            run = read_run_directory(args.model)
            model_file, class_names = run["model_file"], run["class_names"]
            calibration, evaluation = run["calibration_data"], run["evaluation_data"]
        model = load_model(model_file)
        options = {}
        for option in INT8_OPTIONS:
            if getattr(args, option) is not None:
                options[option] = getattr(args, option)
        report = export_model(
            model,
            args.output,
            formats=formats,
            calibration_data=args.calibration_data or calibration,
            evaluation_data=args.evaluation_data or evaluation,
            version=args.version,
            model_name=args.model_name,
            top_k=args.top_k,
            model_file=model_file,
            class_names=getattr(model, "class_names", None) or class_names,
            run=None if run is None else {k: run[k] for k in ("run_directory", "data")},
            **options,
        )
    except ExportInputError as error:
        print(f"export.py: error: {error}", file=sys.stderr)
        return 2
    except ExportError as error:
        print(f"export.py: error: {error}", file=sys.stderr)
        return 1
    print(format_table(report))
    print(f"Report: {os.path.join(args.output, 'report.json')}")
    failed = [e for e in report["exports"] if "check" in e and not e["check"]["passed"]]
    for entry in failed:
        print(f"export.py: warning: {entry['file']} misses its parity bound", file=sys.stderr)
    fatal = failed if args.strict else [e for e in failed if e["format"] in FLOAT32_FORMATS]
    return 1 if fatal else 0


if __name__ == "__main__":
    sys.exit(main())
