"""Export for serving and the edge: SavedModel (TF Serving) and TFLite, checked against Keras.

    export_model(model, output_dir, formats, calibration_data, evaluation_data, ...) -> report
    export_saved_model(model, path, top_k=5, class_names=None)   with TF Serving warm-up records
    export_tflite(model, path, quantization="fp32", representative_images=None) -> op names
    read_labels(tflite_path)                 the class names stored inside a .tflite file
    check_parity(model, path, images, variant=None) -> sizes, latency, parity, pass/fail
    decode_and_resize(image_bytes, size)     the one resize rule of serving and evaluation
    read_run_directory(run_dir)              the model and images of a train.py run

The command line is `python export.py MODEL.keras|RUN_DIR --output DIR` (`keras_fg.export.cli`).
"""

from keras_fg.export.errors import ExportError, ExportInputError
from keras_fg.export.exporter import DEFAULT_FORMATS, FORMATS, export_model, format_table
from keras_fg.export.flatbuffer import tflite_ops
from keras_fg.export.parity import CHECKS, check_parity
from keras_fg.export.preprocess import RESIZE_RULE, decode_and_resize, load_images
from keras_fg.export.run_directory import read_run_directory
from keras_fg.export.saved_model import export_saved_model, write_warmup_requests
from keras_fg.export.tflite import (
    QUANTIZATIONS,
    export_tflite,
    read_labels,
    run_tflite,
    write_labels,
)
