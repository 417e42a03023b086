"""What the input path costs: the pipeline's ceiling, and GAP's training rate with and without it.

1. The ceiling, in batches/s: real JPEGs of the shared CUB subset, the training augmentation
   (resize to 256, random 224 crop, flip), batch 32, fed to `fit` of a model that does nothing
   (a scalar times each image's mean), through two paths in the same run:
   - `generator`: a Python generator yielding each epoch's tf.data pipeline, one batch per
     Python step (how train.py fed `fit` before);
   - `tf.data`: one tf.data pipeline over all epochs (`make_pipeline(..., epochs=...)`, what
     train.py feeds `fit` now), prefetched, no Python step per batch.
2. GAP on MobileNetV2 (224 px, batch 32, every layer, BatchNormalization frozen): images/s
   through `train.py` on the shared subset (its second epoch), against the same model's
   `fit` on one random batch repeated (no input cost at all).

    python bench/input_path.py

Writes bench/results/input_path.json.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import CUB_ROOT, MOBILENET_WEIGHTS, ROOT, require_shared, write_json

BATCH = 32
SIZE = 224


def epoch_timer():
    """A Keras callback keeping each epoch's wall time in `.seconds`."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.started)

    return EpochTimer()


def idle_model():
    """A model whose step costs nothing next to the input: w · mean(image)."""
    import keras

    images = keras.Input((SIZE, SIZE, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(images)
    score = keras.layers.Dense(1)(keras.layers.Lambda(lambda x: x[:, :1])(pooled))
    model = keras.Model(images, score)
    model.compile(optimizer="sgd", loss="mse")
    return model


def ceiling(epochs):
    """Batches/s of each path, per epoch after the first (which traces)."""
    from keras_fg.data import load_dataset, make_pipeline

    records = load_dataset("cub", CUB_ROOT, "train")
    steps = len(records) // BATCH

    def generator():
        for epoch in range(epochs):
            seed = int(np.random.SeedSequence([0, epoch]).generate_state(1)[0] % 2**31)
            pipeline = make_pipeline(records, SIZE, BATCH, training=True, seed=seed)
            yield from pipeline.repeat().take(steps)

    paths = {
        "generator": generator,
        "tf.data": lambda: make_pipeline(
            records, SIZE, BATCH, training=True, seed=0, epochs=(0, epochs), steps_per_epoch=steps
        ),
    }
    results = {}
    for name, data in paths.items():
        timer = epoch_timer()
        idle_model().fit(data(), steps_per_epoch=steps, epochs=epochs, callbacks=[timer], verbose=0)
        rates = [steps / s for s in timer.seconds[1:]]
        results[name] = {
            "batches_per_second": float(np.median(rates)),
            "per_epoch": [round(r, 2) for r in rates],
            "steps_per_epoch": steps,
        }
        print(f"{name}: {results[name]['batches_per_second']:.2f} batches/s", flush=True)
    return results


def train_py_rate():
    """GAP's images/s in train.py's second epoch on the shared subset."""
    with tempfile.TemporaryDirectory(prefix="keras_fg_bench_") as workdir:
        arguments = [
            "--model", "gap", "--data", str(CUB_ROOT), "--weights", str(MOBILENET_WEIGHTS),
            "--epochs", "2", "--warmup-epochs", "0", "--learning-rate", "1e-4",
            "--validation-freq", "0", "--verbose", "0", "--output", str(Path(workdir) / "run"),
        ]  # fmt: skip
        subprocess.run([sys.executable, str(ROOT / "train.py"), *arguments], check=True, cwd=ROOT)
        evaluation = json.loads((Path(workdir) / "run" / "evaluation.json").read_text())
    steps = 1500 // BATCH
    return steps * BATCH / evaluation["epoch_seconds"][-1]


def random_tensor_rate(steps=20):
    """The same model and step on one random batch repeated: no decoding, no augmentation."""
    import keras
    import tensorflow as tf

    from keras_fg.models import create_model

    model = create_model("gap", 50, weights=str(MOBILENET_WEIGHTS), image_size=SIZE)
    model.compile(optimizer=keras.optimizers.AdamW(1e-4, weight_decay=1e-4))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (BATCH, SIZE, SIZE, 3)).astype("float32")
    labels = rng.integers(0, 50, BATCH).astype("int32")
    data = tf.data.Dataset.from_tensors((images, labels)).repeat()
    timer = epoch_timer()
    model.fit(data, steps_per_epoch=steps, epochs=3, callbacks=[timer], verbose=0)
    return float(np.median([steps * BATCH / s for s in timer.seconds[1:]]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each ceiling path")
    args = parser.parse_args()
    require_shared(CUB_ROOT, MOBILENET_WEIGHTS)
    results = {"ceiling": ceiling(args.epochs)}
    generator, pipeline = (
        results["ceiling"][k]["batches_per_second"] for k in ("generator", "tf.data")
    )
    results["ceiling"]["tf_data_over_generator"] = pipeline / generator
    through_train_py = train_py_rate()
    on_random_tensors = random_tensor_rate()
    results["gap_training"] = {
        "train_py_images_per_second": through_train_py,
        "random_tensors_images_per_second": on_random_tensors,
        "input_path_share_of_step_time": 1 - through_train_py / on_random_tensors,
    }
    print(
        f"GAP: {through_train_py:.1f} img/s through train.py, {on_random_tensors:.1f} on "
        "random tensors",
        flush=True,
    )
    write_json(
        "input_path",
        {
            "benchmark": "input_path",
            "command": "python bench/input_path.py",
            "settings": f"CUB subset train split, {SIZE} px, batch {BATCH}, training augmentation",
            **results,
        },
    )


if __name__ == "__main__":
    main()
