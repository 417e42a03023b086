"""Command-line programs: train.py, export.py and predict.py call into these modules."""
