"""`python export.py MODEL.keras --output DIR`: SavedModel and TFLite files, checked, reported."""

import argparse
import os
import sys

from keras_fg.export.errors import ExportError, ExportInputError
from keras_fg.export.exporter import FORMATS, export_model, format_table, parse_formats

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
        "that misses its bound is reported, not fatal.",
    )
    parser.add_argument("model", help="the trained model, a .keras file")
    parser.add_argument("--output", required=True, metavar="DIR", help="the export directory")
    parser.add_argument(
        "--formats",
        default=",".join(FORMATS),
        help=f"comma-separated, any of: {', '.join(FORMATS)} (default: all)",
    )
    data = parser.add_argument_group("images")
    data.add_argument(
        "--calibration-data",
        metavar="DIR",
        help="a folder of training images (any nesting) to calibrate full-integer int8 "
        "(default: the evaluation images; without either, int8 is skipped)",
    )
    data.add_argument(
        "--evaluation-data",
        metavar="DIR",
        help="a folder of real images (any nesting) for the parity checks "
        "(default: synthetic images, stated in the report)",
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
        model = load_model(args.model)
        report = export_model(
            model,
            args.output,
            formats=formats,
            calibration_data=args.calibration_data,
            evaluation_data=args.evaluation_data,
            version=args.version,
            model_name=args.model_name,
            top_k=args.top_k,
            model_file=args.model,
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
    return 1 if any(e["format"] in FLOAT32_FORMATS for e in failed) else 0


if __name__ == "__main__":
    sys.exit(main())
