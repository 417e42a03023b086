"""Does looking closer pay on the CUB subset? Attention-guided zoom on frozen features.

A probe for MA-CNN's part crops (issue 14), cheap enough to run before a fine-tuned one:
MobileNetV2 with the shared weights, frozen, BatchNormalization in inference mode.

1. Each image (the whole 227-px image resized to 224) gives its 7×7×1,280 feature map F.
2. Saliency is the channel sum Σ_c F; the zoom box is the bounding box of the cells above the
   map's mean, padded by half a cell and clipped to the image.
3. The box is cropped from the 224-px image and resized back to 224 (bilinear), and its
   pooled features are computed by the same frozen network.
4. Softmax regression (C = 1, as `bench/accuracy.py`'s floor) on: the global features; the
   zoom's; both concatenated; and the sum of the two separate classifiers' logits.

The control zooms as much, at the wrong place: each image's box of the same size, centred.
Test images are scored the same way (no flips, no training on test).

    python bench/zoom.py

Writes bench/results/zoom.json.
"""

import sys
import time

import numpy as np
from accuracy import logistic_regression, report
from common import CUB_ROOT, MOBILENET_WEIGHTS, require_shared, write_json


def saliency_boxes(features, pad=0.5):
    """`(N, 4)` normalised `[y1, x1, y2, x2]`: cells above the mean saliency, padded."""
    saliency = features.sum(-1)
    _, h, w = saliency.shape
    boxes = []
    for cells in saliency:
        ys, xs = np.nonzero(cells > cells.mean())
        boxes.append(
            [
                max((ys.min() - pad) / h, 0.0),
                max((xs.min() - pad) / w, 0.0),
                min((ys.max() + 1 + pad) / h, 1.0),
                min((xs.max() + 1 + pad) / w, 1.0),
            ]
        )
    return np.asarray(boxes, "float32")


def centred(boxes):
    """Boxes of the same height and width, centred in the image."""
    h, w = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return np.stack([(1 - h) / 2, (1 - w) / 2, (1 + h) / 2, (1 + w) / 2], axis=1)


def main():
    import tensorflow as tf

    from keras_fg.data import load_dataset, make_pipeline
    from keras_fg.models import create_model, split_at_backbone

    require_shared(CUB_ROOT, MOBILENET_WEIGHTS)
    start = time.perf_counter()
    model = create_model("gap", 50, weights=str(MOBILENET_WEIGHTS), image_size=224)
    backbone = split_at_backbone(model)[0]

    def images(split):
        batches = list(make_pipeline(load_dataset("cub", CUB_ROOT, split), 224, 64, training=False))
        return (
            np.concatenate([b[0].numpy() for b in batches]),
            np.concatenate([b[1] for b in batches]),
        )

    def zoomed_features(x, boxes):
        crops = [
            tf.image.crop_and_resize(
                x[i : i + 64], boxes[i : i + 64], tf.range(len(x[i : i + 64])), (224, 224)
            )
            for i in range(0, len(x), 64)
        ]
        return backbone.predict(np.concatenate(crops), batch_size=64, verbose=0).mean(axis=(1, 2))

    x = {}
    for split in ("train", "test"):
        x[split], x[f"{split}_labels"] = images(split)
        x[f"{split}_map"] = backbone.predict(x[split], batch_size=64, verbose=0)
    labels = x["test_labels"]

    def classify(train_features, test_features):
        return logistic_regression(train_features, x["train_labels"], test_features, 50)

    pooled = {s: x[f"{s}_map"].mean(axis=(1, 2)) for s in ("train", "test")}
    global_logits = classify(pooled["train"], pooled["test"])
    results = {"global": report(labels, global_logits)}
    boxes = {s: saliency_boxes(x[f"{s}_map"]) for s in ("train", "test")}
    for name, make in (("attention_zoom", lambda b: b), ("centred_zoom_same_size", centred)):
        zoom = {s: zoomed_features(x[s], make(boxes[s])) for s in ("train", "test")}
        zoom_logits = classify(zoom["train"], zoom["test"])
        both = {s: np.concatenate([pooled[s], zoom[s]], axis=1) for s in ("train", "test")}
        results[name] = {
            "zoom_alone": report(labels, zoom_logits),
            "global_plus_zoom_logits": report(labels, global_logits + zoom_logits),
            "concatenated_features": report(labels, classify(both["train"], both["test"])),
        }
        print(name, results[name], flush=True)
    area = (boxes["test"][:, 2] - boxes["test"][:, 0]) * (boxes["test"][:, 3] - boxes["test"][:, 1])
    write_json(
        "zoom",
        {
            "benchmark": "zoom",
            "command": "python bench/zoom.py " + " ".join(sys.argv[1:]),
            "dataset": "CUB-200-2011 subset, 50 classes, 1,500 train / 1,449 test",
            "backbone": "mobilenetv2 (shared weights), frozen, 224 px",
            "box": "cells above the mean channel-sum saliency, padded by half a cell",
            "mean_box_area_fraction": float(area.mean()),
            "classifier": "softmax regression, C=1, full batch (bench/accuracy.py's floor)",
            "results": results,
            "seconds": time.perf_counter() - start,
        },
    )


if __name__ == "__main__":
    main()
