#!/usr/bin/env python
"""Train and evaluate a keras_fg model. `python train.py --help` lists every flag."""

from keras_fg.cli.train import main

if __name__ == "__main__":
    main()
