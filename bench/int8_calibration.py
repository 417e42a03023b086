"""How much the default int8 file's agreement with Keras moves with its calibration images.

`bench/export_latency.py` calibrates each int8 file on one draw of 300 training images (6 per
class, `stratified_indices(..., seed=0)`). This exports the default int8 file of each trained
CUB model (the same models, the head then every layer trained, from bench/cache/) on several
draws of the same size and checks each against Keras on all 1,449 test images, as
`check_parity` does (and its top-1 accuracy on the labels against Keras's), so that the table
can give the agreement as a mean over draws with its spread, not the figure of one lucky or
unlucky draw. Figures of a model trained by another recipe, or of an int8 file made with other
defaults (`int8_defaults`), are measured again.

    python bench/int8_calibration.py                          # gap, bcnn, macnn; draws 0-3
    python bench/int8_calibration.py --families macnn --draws 0 1

Writes bench/results/int8_calibration.json after each file, and skips the (family, draw)
pairs it already holds, so an interrupted run resumes where it stopped.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import CUB_ROOT, FAMILIES, MOBILENET_WEIGHTS, RESULTS, require_shared, write_json
from export_latency import CALIBRATION_IMAGES, RECIPE, trained_model

NAME = "int8_calibration"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=["gap", "bcnn", "macnn"],
                        choices=list(FAMILIES))  # fmt: skip
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2, 3],
                        help="the seeds of the calibration draws (0: export_latency.py's)")  # fmt: skip
    args = parser.parse_args()
    require_shared(CUB_ROOT, MOBILENET_WEIGHTS)

    from keras_fg.data import load_dataset
    from keras_fg.export import export_tflite, int8, run_tflite
    from keras_fg.export.parity import model_outputs
    from keras_fg.export.preprocess import load_images
    from keras_fg.export.run_directory import stratified_indices

    # A change of the default int8 file's choices makes another file: measure it again.
    defaults = {
        "int8_float_stem": int8.INT8_FLOAT_STEM,
        "int8_float_layers": int8.INT8_FLOAT_LAYERS,
        "int8_float_head": int8.INT8_FLOAT_HEAD,
        "int8_head_weights": int8.INT8_HEAD_WEIGHTS,
        "hybrid_ops": list(int8.HYBRID_OPS),
    }
    path = RESULTS / f"{NAME}.json"
    families = json.loads(path.read_text())["families"] if path.exists() else {}
    train = load_dataset("cub", CUB_ROOT, "train")
    test = load_dataset("cub", CUB_ROOT, "test")
    images = None
    for family in args.families:
        entry = families.get(family)
        recipe = (entry or {}).get("training", {}).get("recipe")
        if recipe != RECIPE or entry.get("int8_defaults") != defaults:  # Another file: redo.
            entry = families[family] = {"draws": {}, "int8_defaults": defaults}
        todo = [draw for draw in args.draws if str(draw) not in entry["draws"]]
        if not todo:
            continue
        model, entry["training"] = trained_model(family)
        if images is None:
            images = load_images(test.paths, 224)["images"]
        reference = model_outputs(model, images)
        keras, labels = reference["probabilities"].argmax(axis=1), np.asarray(test.labels)
        for draw in todo:
            print(f"{family}, draw {draw} ...", flush=True)
            start = time.perf_counter()
            indices = stratified_indices(train.labels, CALIBRATION_IMAGES, seed=draw)
            pixels = load_images([train.paths[i] for i in indices], 224)["images"]
            with tempfile.TemporaryDirectory(prefix="keras_fg_int8_") as workdir:
                file = Path(workdir) / f"{family}_int8.tflite"
                export_tflite(model, file, "int8", representative_images=pixels)
                int8 = run_tflite(file, images)["probabilities"].argmax(axis=1)
            agreement = float(np.mean(int8 == keras))
            entry["keras_accuracy"] = float(np.mean(keras == labels))
            entry["draws"][str(draw)] = {
                "top1_agreement": agreement,
                "changed_images": round((1 - agreement) * len(images)),
                "accuracy": float(np.mean(int8 == labels)),
                "seconds": round(time.perf_counter() - start, 1),
            }
            agreements = [d["top1_agreement"] for d in entry["draws"].values()]
            held = " ".join(sorted(entry["draws"], key=int))
            entry.update(
                model=FAMILIES[family][0],
                # Reproduces every draw held (runs resume, so they may come from several runs).
                command=f"python bench/int8_calibration.py --families {family} --draws {held}",
                mean=statistics.mean(agreements),
                min=min(agreements),
                max=max(agreements),
            )
            print(f"  top-1 agreement {agreement:.2%}", flush=True)
            write_json(NAME, {
                "benchmark": NAME,
                "settings": "the default int8 file of the MobileNetV2 models trained on the "
                "CUB subset (bench/export_latency.py's models: the head, then every layer), "
                f"224 px, calibrated on "
                f"{CALIBRATION_IMAGES} training images drawn per class "
                "(`stratified_indices(labels, 300, seed=draw)`); agreement: top-1 against "
                f"Keras on the {len(images)} CUB test images",
                "families": families,  # Each with the command that measured it.
            })  # fmt: skip


if __name__ == "__main__":
    main()
