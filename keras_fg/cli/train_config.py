"""train.py's command line: argument groups, a config file that sets their defaults, checks."""

import argparse
import json
import os
from pathlib import Path

from keras_fg.data.datasets import FORMATS
from keras_fg.models.backbones import (
    LAYER_NORM_LR_MULTIPLIER,
    is_hub_name,
    is_layer_normalized,
    list_backbones,
    offers_last_stride_1,
)
from keras_fg.models.factory import list_models

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")
DATA_FORMATS = tuple(FORMATS) + ("synthetic",)
# Keys that describe where or how a run executes, not what it computes: a run directory
# may be resumed with different values of these.
RUNTIME_KEYS = (
    "config",
    "output",
    "resume",
    "strategy",
    "verbose",
    "strict_data",
    "feature_cache_memory",
)
# Where run directories go by default; RUNS / "latest" names the newest.
RUNS = Path("runs")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless its help already says it, or it has none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="train.py",
        description=(
            "Train and evaluate a keras_fg model. With no arguments: the default family on the "
            "built-in synthetic fine-grained dataset."
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--config", metavar="FILE", help="YAML or JSON file setting any flag's default"
    )

    task = parser.add_argument_group("task and data")
    task.add_argument(
        "--task",
        choices=("classify", "reid"),
        default="classify",
        help="classification, or person re-identification",
    )
    task.add_argument("--data", metavar="DIR", help="dataset folder (omit for synthetic data)")
    task.add_argument("--format", choices=DATA_FORMATS, help="dataset layout (default: detected)")
    task.add_argument(
        "--annotation",
        choices=("variant", "family", "manufacturer"),
        default="variant",
        help="FGVC-Aircraft label level",
    )
    task.add_argument(
        "--validation-fraction",
        type=float,
        default=None,
        help="folder format: hold out this fraction of each class when there is no split",
    )
    task.add_argument(
        "--strict-data",
        action="store_true",
        help="stop at the first unreadable image (default: skip and count it)",
    )
    task.add_argument("--synthetic-classes", type=int, default=10, help="synthetic classes")
    task.add_argument("--synthetic-train", type=int, default=2000, help="synthetic training images")
    task.add_argument("--synthetic-test", type=int, default=500, help="synthetic test images")
    task.add_argument(
        "--synthetic-clutter", type=int, default=6, help="synthetic background shapes per image"
    )
    task.add_argument(
        "--synthetic-noise",
        type=float,
        default=8.0,
        help="synthetic pixel noise, standard deviation on the 0-255 scale",
    )
    task.add_argument(
        "--max-train-images",
        type=int,
        default=None,
        help="use at most this many training images (quick runs)",
    )
    task.add_argument(
        "--max-test-images",
        type=int,
        default=None,
        help="evaluate on at most this many images (quick runs)",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        choices=list_models(),
        default=None,
        help="model family (default: macnn; pcb for --task reid)",
    )
    model.add_argument(
        "--backbone",
        type=backbone_name,
        metavar="{" + ",".join(list_backbones()) + ",hub:PRESET}",
        help="default: tiny for synthetic data, mobilenetv2 otherwise; hub:PRESET is a "
        "keras-hub preset name or folder (pip install keras-fg[hub]; no --weights)",
    )
    model.add_argument(
        "--weights",
        default=None,
        help='backbone weights: "imagenet" or a local .weights.h5 file (default: random)',
    )
    model.add_argument(
        "--image-size",
        type=int,
        nargs="+",
        metavar="PIXELS",
        help="side, or height width (default: 64 synthetic, 224 classify, 256 128 reid)",
    )
    model.add_argument("--num-parts", type=int, default=4, help="macnn: parts")
    model.add_argument(
        "--num-stripes", type=int, default=6, help="pcb: horizontal stripes of the feature map"
    )
    model.add_argument(
        "--descriptor",
        choices=("stripes", "fused"),
        default="stripes",
        help="pcb: the features served, the weighed stripes or the fused vector (default: stripes)",
    )
    model.add_argument(
        "--part-crop-size",
        type=int,
        default=None,
        help="macnn: also classify each part's crop at this size (full MA-CNN)",
    )
    model.add_argument(
        "--projection-dim", type=int, default=None, help="bcnn: compact bilinear size"
    )
    model.add_argument("--reduction-dim", type=int, default=256, help="bcnn: 1x1 conv channels")
    model.add_argument("--stream-dim", type=int, default=16, help="dasrbn: channels of each stream")
    model.add_argument(
        "--lstm-units", type=int, default=32, help="dasrbn: spatial LSTM units of each sweep"
    )
    model.add_argument(
        "--dropout",
        type=float,
        default=None,
        help="dropout before the classifier (default: the family's own, 0.5 for dasrbn, else 0)",
    )
    model.add_argument(
        "--train-batchnorm",
        action="store_true",
        help="let the backbone's BatchNormalization learn (default: frozen)",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, help="default: 30 on synthetic data, 12 otherwise")
    optim.add_argument("--batch-size", type=int, default=32, help="global batch size")
    optim.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="default: 3e-3 (1e-3 for dasrbn); 3.5e-4 for --task reid",
    )
    optim.add_argument("--optimizer", choices=("sgd", "adamw"), default="adamw")
    optim.add_argument("--momentum", type=float, default=0.9, help="sgd momentum (Nesterov)")
    optim.add_argument("--weight-decay", type=float, default=1e-4)
    optim.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    optim.add_argument(
        "--warmup-epochs",
        type=float,
        default=None,
        help="linear learning-rate warm-up (0: off; default: 1, a tenth of the epochs for "
        "macnn from scratch)",
    )
    optim.add_argument(
        "--head-epochs",
        type=int,
        default=0,
        help="train only the head (backbone frozen) for the first N of --epochs, on cached "
        "features by default (see --cache-features)",
    )
    optim.add_argument(
        "--cache-features",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="head phase: compute the backbone's features of the training images and their "
        "flips once and train the head on them (default: on where the head reads only the "
        "backbone's features; classification only)",
    )
    optim.add_argument(
        "--head-learning-rate",
        type=float,
        default=None,
        help="head phase: its own learning rate, cosine to 0 over --head-epochs, no warm-up "
        "(default: --learning-rate)",
    )
    optim.add_argument(
        "--head-batch-size",
        type=int,
        default=None,
        help="head phase: its batch size (default: --batch-size)",
    )
    optim.add_argument(
        "--feature-cache-memory",
        default="auto",
        metavar="GIB",
        help="head phase: a feature cache larger than this goes to disk in the run directory "
        "(default: auto, half of the machine's memory)",
    )
    optim.add_argument(
        "--backbone-lr-multiplier",
        type=float,
        default=None,
        help="the backbone learns at learning-rate times this (default: "
        f"{LAYER_NORM_LR_MULTIPLIER} for LayerNorm backbones, convnext* and hub: transformers, "
        "which have no BatchNormalization to freeze; else 1)",
    )
    optim.add_argument(
        "--validation-freq",
        type=int,
        default=1,
        help="evaluate on the evaluation images every N epochs during training (0: only the "
        "final evaluation)",
    )
    optim.add_argument(
        "--label-smoothing",
        type=float,
        default=None,
        help="of every cross-entropy (default: 0; 0.1 for --task reid)",
    )
    optim.add_argument(
        "--class-weight",
        choices=("none", "balanced"),
        default="none",
        help="balanced: weight each class by N / (classes x its images), for imbalanced data",
    )
    optim.add_argument(
        "--augment",
        nargs="*",
        default=[],
        choices=("randaugment", "mixup", "cutmix", "random_erasing"),
        help="training augmentations",
    )
    optim.add_argument(
        "--eval-resize",
        choices=("resize", "center_crop"),
        default="resize",
        help="evaluation transform: the whole image resized, or a centre crop",
    )
    optim.add_argument(
        "--macnn-init",
        choices=("clustering", "none"),
        default=None,
        help="macnn: initialise the channel grouping by clustering channels (default: "
        "clustering with pretrained --weights, none from scratch)",
    )
    optim.add_argument(
        "--macnn-init-epoch",
        type=int,
        default=None,
        help="macnn: cluster before this epoch (default: 0 with pretrained "
        "--weights, else after a tenth of the epochs, when the backbone "
        "has learned)",
    )
    optim.add_argument(
        "--macnn-phases",
        default="joint",
        help="macnn: comma-separated phases repeated over epochs, e.g. "
        '"channel_grouping,classification" (default: joint)',
    )
    optim.add_argument(
        "--channel-grouping-weight",
        type=float,
        default=1.0,
        help="macnn: weight of the channel-grouping loss",
    )
    optim.add_argument(
        "--diversity-weight",
        type=float,
        default=1.0,
        help="macnn: weight λ of Div inside the channel-grouping loss",
    )
    optim.add_argument(
        "--initial-temperature",
        type=float,
        default=2.0,
        help="macnn: the part maps' inverse temperature at the start",
    )
    optim.add_argument(
        "--min-temperature",
        type=float,
        default=1.0,
        help="macnn: the lower bound of the part maps' inverse temperature",
    )
    optim.add_argument(
        "--maps-train-backbone",
        action="store_true",
        help="macnn: let the channel-grouping loss and the part maps' gradients train the "
        "backbone too (default: they train the channel grouping only, as in the paper)",
    )

    reid = parser.add_argument_group("re-identification (--task reid)")
    reid.add_argument("--num-identities", type=int, default=8, help="P of P x K sampling")
    reid.add_argument("--num-instances", type=int, default=4, help="K of P x K sampling")
    reid.add_argument(
        "--metric-loss",
        choices=("triplet", "circle"),
        default="triplet",
        help="metric-learning loss on the embedding, beside the BNNeck cross-entropy",
    )
    reid.add_argument(
        "--triplet-weight",
        type=float,
        default=1.0,
        help="weight of the metric-learning loss (0: none)",
    )
    # The "bag of tricks" (Luo et al. 2019), each on by default and each switchable off;
    # warm-up is --warmup-epochs (0: off) and label smoothing --label-smoothing (0: off).
    reid.add_argument(
        "--random-erasing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random erasing of training images (default: on)",
    )
    reid.add_argument(
        "--last-stride",
        type=int,
        choices=(1, 2),
        default=None,
        help="stride of the backbone's last downsampling step (default: 1, where "
        "the backbone offers it: a 16x8 grid at 256x128 for mobilenetv2)",
    )
    reid.add_argument(
        "--bnneck",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="BatchNormalization between the metric losses and the classifier (default: on)",
    )
    reid.add_argument(
        "--center-loss-weight",
        type=float,
        default=None,
        help="weight of the center loss (default: 5e-4; 0: off)",
    )
    reid.add_argument(
        "--part-weights",
        choices=("fisher", "equal"),
        default="fisher",
        help="pcb: weigh the stripes of the descriptor by their Fisher scores on the training "
        "identities, after training (default), or equally",
    )
    reid.add_argument("--triplet-margin", type=float, default=0.3, help="triplet margin")
    reid.add_argument("--reid-metric", choices=("cosine", "euclidean"), default="cosine")
    reid.add_argument("--re-ranking", action="store_true", help="k-reciprocal re-ranking")
    reid.add_argument(
        "--flip-test",
        action="store_true",
        help="average each embedding with its horizontal flip's (evaluation.json "
        "reports all four of plain/flip x with/without re-ranking anyway)",
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "--output",
        metavar="DIR",
        default=None,
        help="run directory (default: a new runs/<model>-<data>-<time>)",
    )
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help='resume an interrupted run: its directory, or "latest"; its '
        "configuration is the default, and flags may not change it",
    )
    run.add_argument("--strategy", choices=STRATEGIES, default="auto")
    run.add_argument(
        "--mixed-precision",
        nargs="?",
        const="auto",
        default="off",
        choices=("off", "auto", "float16", "bfloat16"),
        help="mixed precision (auto: float16 on GPU, bfloat16 elsewhere)",
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--no-determinism",
        dest="deterministic",
        action="store_false",
        help="allow non-deterministic kernels (faster on some GPUs)",
    )
    run.add_argument("--verbose", type=int, default=2, choices=(0, 1, 2))
    return parser


def load_config_file(path):
    """Flag defaults from a YAML or JSON file; keys may use dashes or underscores."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        values = json.loads(text)
    else:
        import yaml

        values = yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of flag names to values")
    return {key.replace("-", "_"): value for key, value in values.items()}


def parse_args(argv=None):
    """Parses the command line; a `--config` file sets defaults that flags override."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        values = load_config_file(first.config)
        known = set(vars(parser.parse_args([])))
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown key(s) in {first.config}: {', '.join(unknown)}")
        parser.set_defaults(**values)
    if first.resume:
        folder = resolve_run_directory(first.resume)
        # The run's own configuration is the default: `--resume DIR` alone continues it.
        parser.set_defaults(**json.loads((folder / "config.json").read_text()))
        parser.set_defaults(resume=str(folder), output=str(folder))
    args = parser.parse_args(argv)
    if args.resume:
        args.resume = args.output = str(resolve_run_directory(args.resume))
    return resolve(args)


def resolve_run_directory(value):
    """The run directory `--resume` names: a folder with a config.json, or "latest"."""
    folder = Path(value)
    if value == "latest":
        latest = RUNS / "latest"
        if latest.is_symlink():
            folder = RUNS / os.readlink(latest)
        elif latest.is_file():  # Systems without symbolic links: the name, as text.
            folder = RUNS / latest.read_text().strip()
        elif not latest.exists():
            raise FileNotFoundError(f"--resume latest: there is no {latest}; no run to resume")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"--resume: {folder} holds no keras_fg run (no config.json). Received: --resume {value}"
        )
    return folder


def backbone_name(value):
    """`--backbone`: a registered name, or `hub:<keras-hub preset name or folder>`."""
    if value in list_backbones() or (is_hub_name(value) and len(value) > len("hub:")):
        return value
    raise argparse.ArgumentTypeError(
        f"invalid choice: {value!r} (choose from {', '.join(list_backbones())}, "
        "or hub:<keras-hub preset name or folder>)"
    )


def resolve(args):
    """Fills the defaults that depend on other flags and checks combinations."""
    if args.format is None:
        args.format = "synthetic" if args.data is None else detect_format(args.data)
    if args.format == "synthetic" and args.data is not None:
        raise ValueError("--format synthetic takes no --data")
    if args.format != "synthetic" and args.data is None:
        raise ValueError(f"--format {args.format} needs --data DIR")
    if args.task == "reid" and args.format not in ("market1501", "folder"):
        raise ValueError(f"--task reid needs --format market1501 or folder, not {args.format}")
    if args.backbone is None:
        args.backbone = "tiny" if args.format == "synthetic" else "mobilenetv2"
    resolve_task_defaults(args)
    if args.image_size is None:
        if args.format == "synthetic":
            args.image_size = [64]
        else:
            args.image_size = [256, 128] if args.task == "reid" else [224]
    if args.epochs is None:
        args.epochs = 30 if args.format == "synthetic" else 12
    if len(args.image_size) not in (1, 2):
        raise ValueError(f"--image-size takes one or two numbers. Received: {args.image_size}")
    args.image_size = [int(v) for v in args.image_size]
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(
                f"--{name.replace('_', '-')} must be >= 1. Received: {getattr(args, name)}"
            )
    if args.learning_rate <= 0:
        raise ValueError(f"--learning-rate must be > 0. Received: {args.learning_rate}")
    if args.head_epochs >= args.epochs and args.head_epochs > 0:
        raise ValueError("--head-epochs must be smaller than --epochs")
    if args.head_epochs < 0 or args.validation_freq < 0:
        raise ValueError(
            f"--head-epochs and --validation-freq must be >= 0. Received: {args.head_epochs} "
            f"and {args.validation_freq}"
        )
    if args.head_learning_rate is None:
        args.head_learning_rate = args.learning_rate
    if args.head_learning_rate <= 0:
        raise ValueError(f"--head-learning-rate must be > 0. Received: {args.head_learning_rate}")
    if args.head_batch_size is None:
        args.head_batch_size = args.batch_size
    if args.head_batch_size < 1:
        raise ValueError(f"--head-batch-size must be >= 1. Received: {args.head_batch_size}")
    if args.feature_cache_memory != "auto":
        try:
            memory = float(args.feature_cache_memory)
        except ValueError:
            memory = -1.0
        if memory < 0:
            raise ValueError(
                "--feature-cache-memory takes a size in GiB >= 0, or auto. "
                f"Received: {args.feature_cache_memory}"
            )
    if args.task == "reid":
        args.batch_size = args.num_identities * args.num_instances
    phases = [p.strip() for p in args.macnn_phases.split(",") if p.strip()]
    valid = ("joint", "channel_grouping", "classification")
    if not phases or any(p not in valid for p in phases):
        raise ValueError(
            f"--macnn-phases takes phases from {valid}. Received: {args.macnn_phases!r}"
        )
    if args.model != "macnn" and phases != ["joint"]:
        raise ValueError("--macnn-phases applies to --model macnn only")
    args.weights = None if args.weights in (None, "", "none", "None") else args.weights
    if is_hub_name(args.backbone) and args.weights:
        raise ValueError(
            f"--backbone {args.backbone} carries its weights: leave --weights out. "
            f"Received: --weights {args.weights}"
        )
    if args.backbone_lr_multiplier is None:
        layer_norm = is_layer_normalized(args.backbone)
        args.backbone_lr_multiplier = LAYER_NORM_LR_MULTIPLIER if layer_norm else 1.0
    if args.backbone_lr_multiplier <= 0:
        raise ValueError(
            f"--backbone-lr-multiplier must be > 0. Received: {args.backbone_lr_multiplier}"
        )
    if args.macnn_init is None:
        # From scratch, clustering by where channels peak splits a part by its place on the
        # body, and the best part points less often (docs/experiments.md#ma-cnn-on-the-synthetic-set).
        args.macnn_init = "clustering" if args.weights else "none"
    if args.warmup_epochs is None:
        # MA-CNN from scratch needs a longer warm-up: after one epoch at 3e-3 the tiny backbone
        # died on one seed of three (docs/experiments.md#ma-cnn-on-the-synthetic-set).
        from_scratch_macnn = args.model == "macnn" and not args.weights
        args.warmup_epochs = float(max(1, args.epochs // 10)) if from_scratch_macnn else 1.0
    if args.warmup_epochs < 0:
        raise ValueError(f"--warmup-epochs must be >= 0. Received: {args.warmup_epochs}")
    if args.macnn_init_epoch is None:
        args.macnn_init_epoch = 0 if args.weights else args.epochs // 10
    if not 0 <= args.macnn_init_epoch < args.epochs:
        raise ValueError(
            f"--macnn-init-epoch must be in [0, --epochs). Received: {args.macnn_init_epoch}"
        )
    return args


def resolve_task_defaults(args):
    """Defaults that differ between classification and re-identification.

    Re-identification defaults to the "bag of tricks" recipe (Luo et al., CVPR-W 2019):
    warm-up, random erasing, label smoothing 0.1, last stride 1, BNNeck, batch-hard triplet
    and center loss; Adam(W) at 3.5e-4; on PCB's stripes with the global feature, its
    descriptor the stripes weighed by their Fisher scores (GAP with it is the paper's
    baseline, `--model gap`; PCB leads it on mini-MARS, see docs/reid.md#on-mini-mars).
    """
    reid = args.task == "reid"
    if args.model is None:
        args.model = "pcb" if reid else "macnn"
    # DASRBN from scratch at 3e-3 kills its backbone on larger grids (synthetic data at
    # 96 px: training accuracy at chance from the first epoch); at 1e-3 it learns.
    classify_rate = 1e-3 if args.model == "dasrbn" else 3e-3
    defaults = {
        "learning_rate": 3.5e-4 if reid else classify_rate,
        "label_smoothing": 0.1 if reid else 0.0,
        "random_erasing": reid,
        "bnneck": reid,
        "center_loss_weight": 5e-4 if reid else 0.0,
        "last_stride": 1 if reid and offers_last_stride_1(args.backbone) else 2,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.last_stride == 1 and not offers_last_stride_1(args.backbone):
        raise ValueError(f"--last-stride 1 is not offered for --backbone {args.backbone}")
    if args.center_loss_weight < 0:
        raise ValueError(f"--center-loss-weight must be >= 0. Received: {args.center_loss_weight}")


def detect_format(root):
    """Guesses a dataset's layout from the files at its root."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    if (root / "images.txt").is_file() and (root / "train_test_split.txt").is_file():
        return "cub"
    if (root / "bounding_box_train").is_dir():
        return "market1501"
    if (root / "data" / "images_variant_test.txt").is_file():
        return "aircraft"
    if (root / "devkit").is_dir() or (root / "cars_train").is_dir():
        return "cars"
    if (root / "Images").is_dir() and (root / "train_list.mat").exists():
        return "dogs"
    return "folder"


def comparable(config):
    """The part of a resolved configuration that decides what a run computes."""
    return {k: v for k, v in config.items() if k not in RUNTIME_KEYS}
