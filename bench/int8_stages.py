"""Where a MobileNetV2 file's one-image time goes, float32 against int8, stage by stage.

The files of `bench/export_latency.py` are timed whole; this says which part of the network
int8 speeds up on this machine. The trained GAP model (bench/cache/, the export table's) is
exported to float32 and to the default int8 file (calibrated on the same 300 training
images). Each file is then cut after the last op of each resolution stage (112, 56, 28, 14
and 7 pixels: the op's output height) and after its last op: a new flatbuffer whose graph
ends there. The int8 files with other float stems (`--stems`, the first N dense or
convolution layers in float: where the int8 graph starts) are timed whole beside them. Every
prefix and file is timed in turns (`rounds` rounds of `calls` one-image calls, one thread,
after a warm-up call; the median of the round medians), and a stage's time is the
difference of two prefixes, so it carries the noise of both.

    python bench/int8_stages.py

Writes bench/results/int8_stages.json.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import CUB_ROOT, MOBILENET_WEIGHTS, require_shared, write_json
from export_latency import CALIBRATION_IMAGES, trained_model

FAMILY = "gap"
SIZE = 224


def prefixes(flatbuffer):
    """`{label: (flatbuffer, ops)}`: the graph cut after the last op of each resolution, and
    whole (label "head")."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(flatbuffer), 0)
    graph = model.subgraphs[0]
    last = {}  # Output height -> index of the last op that writes it.
    for index, op in enumerate(graph.operators):
        shape = list(graph.tensors[op.outputs[0]].shape)
        if len(shape) == 4 and shape[1] < SIZE:
            last[int(shape[1])] = index
    # A stage's label names the resolution of its ops' outputs; "head": the ops after them.
    cuts = {f"{h}x{h}": index + 1 for h, index in sorted(last.items(), reverse=True)}
    cuts["head"] = len(graph.operators)
    result = {}
    for label, count in cuts.items():
        cut = schema.ModelT.InitFromPackedBuf(bytearray(flatbuffer), 0)
        ops = cut.subgraphs[0].operators[:count]
        cut.subgraphs[0].operators = ops
        cut.subgraphs[0].outputs = list(ops[-1].outputs)
        cut.signatureDefs = None  # The signature names outputs that a cut graph lacks.
        builder = flatbuffers.Builder(len(flatbuffer) + 1024)
        builder.Finish(cut.Pack(builder), file_identifier=b"TFL3")
        result[label] = (bytes(builder.Output()), count)
    return result


def timed_in_turns(programs, rounds, calls):
    """`{key: ms}` for `{key: flatbuffer}`, each the median of its round medians."""
    from ai_edge_litert.interpreter import Interpreter

    runners = {}
    for key, flatbuffer in programs.items():
        interpreter = Interpreter(model_content=flatbuffer, num_threads=1)
        interpreter.allocate_tensors()
        index = interpreter.get_input_details()[0]["index"]
        interpreter.set_tensor(index, np.full((1, SIZE, SIZE, 3), 127.5, "float32"))
        runners[key] = interpreter
    medians = {key: [] for key in runners}
    for _ in range(rounds):
        for key, interpreter in runners.items():
            interpreter.invoke()
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                interpreter.invoke()
                times.append(time.perf_counter() - start)
            medians[key].append(statistics.median(times))
    return {key: 1000 * statistics.median(values) for key, values in medians.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--stems", type=int, nargs="*", default=[0, 2, 6],
                        help="int8 files with these float stems are timed whole beside the "
                        "default's (default: 0 2 6)")  # fmt: skip
    args = parser.parse_args()
    require_shared(CUB_ROOT, MOBILENET_WEIGHTS)

    from keras_fg.data import load_dataset
    from keras_fg.export import export_tflite, int8
    from keras_fg.export.preprocess import load_images
    from keras_fg.export.run_directory import stratified_indices

    model, training = trained_model(FAMILY)
    train = load_dataset("cub", CUB_ROOT, "train")
    indices = stratified_indices(train.labels, CALIBRATION_IMAGES)
    pixels = load_images([train.paths[i] for i in indices], SIZE)["images"]
    programs, ops = {}, {}
    with tempfile.TemporaryDirectory(prefix="keras_fg_stages_") as workdir:
        for quantization in ("fp32", "int8"):
            path = Path(workdir) / f"{FAMILY}_{quantization}.tflite"
            export_tflite(model, path, quantization, representative_images=pixels)
            for label, (flatbuffer, count) in prefixes(path.read_bytes()).items():
                programs[quantization, label] = flatbuffer
                ops[quantization, label] = count
        # Where the float stem ends moves the int8 graph's start: the whole files, timed too.
        for stem in sorted(set(args.stems) - {int8.INT8_FLOAT_STEM}):
            path = Path(workdir) / f"{FAMILY}_int8_stem{stem}.tflite"
            export_tflite(model, path, "int8", representative_images=pixels, int8_float_stem=stem)
            programs[f"stem{stem}", "head"] = path.read_bytes()
    times = timed_in_turns(programs, args.rounds, args.calls)
    stages, before = [], {"fp32": 0.0, "int8": 0.0}
    for label in dict.fromkeys(label for key, label in programs if key in ("fp32", "int8")):
        row = {"stage": label}
        for quantization in ("fp32", "int8"):
            total = times[quantization, label]
            row[f"{quantization}_ops"] = ops[quantization, label]
            row[f"{quantization}_through_ms"] = round(total, 3)
            row[f"{quantization}_stage_ms"] = round(total - before[quantization], 3)
            before[quantization] = total
        if row["int8_stage_ms"] > 0:
            row["int8_speedup"] = round(row["fp32_stage_ms"] / row["int8_stage_ms"], 2)
        stages.append(row)
        print(
            f"  {label}: float32 {row['fp32_stage_ms']:.2f} ms, int8 {row['int8_stage_ms']:.2f} ms"
        )
    write_json("int8_stages", {
        "benchmark": "int8_stages",
        "command": "python bench/int8_stages.py " + " ".join(sys.argv[1:]),
        "settings": f"MobileNetV2 GAP trained on the CUB subset ({training['recipe']}), {SIZE} px; "
        "its float32 and default int8 files (int8 calibrated on 300 training images), each cut "
        "after the last op of each output resolution; prefixes timed in turns, one thread, "
        f"{args.rounds} rounds of {args.calls} one-image calls; a stage's time is the "
        "difference of two prefixes",
        "stages": stages,
        "float_stems": [
            {"int8_float_stem": stem, "default": stem == int8.INT8_FLOAT_STEM,
             "latency_ms": round(times[key, "head"], 3),
             "speed_vs_fp32": round(times["fp32", "head"] / times[key, "head"], 3)}
            for stem, key in sorted([(int8.INT8_FLOAT_STEM, "int8")]
                                    + [(s, f"stem{s}") for s in args.stems
                                       if s != int8.INT8_FLOAT_STEM])
        ],
    })  # fmt: skip


if __name__ == "__main__":
    main()
