#!/usr/bin/env python
"""Run a trained model on images: `python predict.py MODEL IMAGE_OR_FOLDER` (see --help)."""

import sys

from keras_fg.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
