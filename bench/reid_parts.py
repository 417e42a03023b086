"""Which part of a re-ID embedding finds people: each part's features alone, on mini-MARS.

For a model trained by `train.py --task reid` (a run directory holding `model.keras`), ranks
the shared mini-MARS queries against the gallery (flip-averaged, cosine, no re-ranking) with:

    features      the embedding train.py evaluates (the model's "features" output)
    global        GAP(F) alone
    parts         the part features concatenated (PCB's stripes, MA-CNN's parts)
    parts_equal   the parts each L2-normalised, weighed equally (`PartWeightedEmbedding`)
    parts_fisher  the same, weighed by their Fisher scores on the training images (its
                  `adapt`, fitted here on the flip-averaged training features)
    part<i>       each part's features alone (PCB: stripe i, top to bottom)

and writes bench/results/reid_parts.json, one entry per run directory. The single parts are
picked here by their test figures: they say where the identity is, they are not a recipe;
the Fisher weights see only the training images.

    python train.py --task reid --data ../shared/data/reid/mini_mars --model pcb \\
        --backbone mobilenetv2 --weights ../shared/weights/mobilenet_v2_1.0.weights.h5 \\
        --image-size 256 128 --epochs 6 --seed 0 --output runs/pcb_seed0
    python bench/reid_parts.py runs/pcb_seed0 [more run directories ...]
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from common import MARS_ROOT, RESULTS, ROOT, machine_info, require_shared

# What each run's config.json says about how it was trained.
SETTINGS = ("model", "num_stripes", "num_parts", "backbone", "image_size", "epochs", "seed")


def part_features(model):
    """The model's `(B, P, C)` part features (its per-part classifiers' input), or None."""
    names = [layer.name for layer in model.layers]
    for name in ("stripe_classifiers", "part_classifiers"):
        if name in names:
            return model.get_layer(name).input
    return None


def embeddings(probe, records, size):
    """Flip-averaged outputs of `probe` for every image of `records`, in order."""
    from keras_fg.data import ImageRecords
    from keras_fg.data.pipeline import make_pipeline

    indexed = ImageRecords(records.paths, np.arange(len(records)), ["0"])
    outputs = {}
    for images, _ in make_pipeline(indexed, size, 32, training=False):
        plain, flipped = probe.predict_on_batch(images), probe.predict_on_batch(images[:, :, ::-1])
        for name in plain:
            outputs.setdefault(name, []).append((np.asarray(plain[name]) + flipped[name]) / 2)
    return {name: np.concatenate(values) for name, values in outputs.items()}


def evaluate_parts(run_dir):
    import keras

    from keras_fg.data import load_dataset
    from keras_fg.layers import PartWeightedEmbedding
    from keras_fg.metrics import evaluate_reid

    model = keras.saving.load_model(Path(run_dir) / "model.keras", compile=False)
    size = tuple(model.input_shape[1:3])
    wanted = {"features": model.output["features"], "global": model.get_layer("global_pool").output}
    parts = part_features(model)
    if parts is not None:
        wanted["parts"] = parts
    probe = keras.Model(model.input, wanted)
    query = load_dataset("market1501", MARS_ROOT, "query")
    gallery = load_dataset("market1501", MARS_ROOT, "gallery")
    q, g = embeddings(probe, query, size), embeddings(probe, gallery, size)
    choices = {"features": (q["features"], g["features"]), "global": (q["global"], g["global"])}
    if parts is not None:
        choices["parts"] = (
            q["parts"].reshape(len(query), -1),
            g["parts"].reshape(len(gallery), -1),
        )
        train = load_dataset("market1501", MARS_ROOT, "train")
        train_parts = embeddings(keras.Model(model.input, {"parts": parts}), train, size)["parts"]
        equal, fisher = PartWeightedEmbedding(), PartWeightedEmbedding()
        fisher.adapt(train_parts, train.labels, train.cameras)
        for name, layer in (("parts_equal", equal), ("parts_fisher", fisher)):
            choices[name] = (np.asarray(layer(q["parts"])), np.asarray(layer(g["parts"])))
        for i in range(q["parts"].shape[1]):
            choices[f"part{i}"] = (q["parts"][:, i], g["parts"][:, i])
    results = {}
    for name, (query_features, gallery_features) in choices.items():
        scores = evaluate_reid(
            query_features, query.labels, query.cameras,
            gallery_features, gallery.labels, gallery.cameras, metric="cosine",
        )  # fmt: skip
        results[name] = {key: scores[key] for key in ("rank1", "mAP", "num_valid_queries")}
    if parts is not None:
        results["parts_fisher"]["part_weights"] = np.asarray(fisher.part_weights).tolist()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="train.py --task reid run directories")
    args = parser.parse_args()
    require_shared(MARS_ROOT)
    path = RESULTS / "reid_parts.json"
    report = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    for run in args.runs:
        config = json.loads((Path(run) / "config.json").read_text())
        results = evaluate_parts(run)
        name = os.path.relpath(os.path.abspath(run), ROOT)
        settings = {key: config.get(key) for key in SETTINGS}
        report["runs"][name] = {"train_config": settings, "results": results}
        print(name, " | ".join(f"{k}: {100 * v['rank1']:.1f} / {100 * v['mAP']:.1f}"
                               for k, v in results.items()), flush=True)  # fmt: skip
    report.update(machine=machine_info(), benchmark="reid_parts")
    path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
