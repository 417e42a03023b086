"""Export a trained keras_fg model: `python export.py MODEL.keras --output DIR` (see --help)."""

import os
import sys

# TensorFlow's C++ start-up lines (oneDNN, CPU features) are noise on a command line.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_fg.export.cli import main

if __name__ == "__main__":
    sys.exit(main())
