"""One factory for every model family, so that one command line can drive them all."""

from keras_fg.models.backbones import backbone_label, create_backbone, has_earlier_feature_layer
from keras_fg.models.bilinear_cnn import BilinearCNN
from keras_fg.models.dasrbn import DASRBN
from keras_fg.models.gap_classifier import GAPClassifier
from keras_fg.models.macnn import MACNN
from keras_fg.models.pcb import PCB

MODELS = {
    "gap": GAPClassifier,
    "bcnn": BilinearCNN,
    "macnn": MACNN,
    "dasrbn": DASRBN,
    "pcb": PCB,
}


def list_models():
    """The names `create_model` accepts."""
    return sorted(MODELS)


def create_model(
    name,
    num_classes,
    backbone="mobilenetv2",
    weights=None,
    image_size=224,
    feature_layer=None,
    second_backbone=None,
    part_crop_size=None,
    last_stride=2,
    **options,
):
    """Builds a model family on a backbone.

    Args:
        name: the family: `"gap"`, `"bcnn"`, `"macnn"`, `"dasrbn"` or `"pcb"`.
        num_classes: number of classes (identities for re-identification).
        backbone: a backbone name from `keras_fg.models.list_backbones()`, or a keras-hub
            preset, `"hub:<preset name or folder>"` (see `create_backbone`).
        weights: the backbone's weights: `None`, `"imagenet"` or a local `.weights.h5` path.
        image_size: input size, an int or `(height, width)`.
        feature_layer: the backbone layer whose output the head reads (default: the
            backbone's own default).
        second_backbone: for `"bcnn"` and `"dasrbn"`, the name of a second stream's backbone
            (same `weights` argument rules; randomly initialised unless `weights` is
            `"imagenet"`). Without it, `"dasrbn"` reads its second stream from an earlier
            block of `backbone` (`BACKBONES[backbone].earlier_feature_layer`) when one is
            registered.
        part_crop_size: for `"macnn"`, the side of the part crops (full MA-CNN: each part is
            cropped around its peak and classified by a part backbone of the same kind,
            sharing `weights`); `None` leaves the crops out.
        last_stride: 1 runs the backbone's last downsampling step at stride 1 (twice the
            feature map's height and width; see `create_backbone`).
        **options: the family's own arguments (e.g. `num_parts=4` for `"macnn"`,
            `projection_dim=8192` for `"bcnn"`) and the `FineGrainedModel` ones
            (`class_names`, `label_smoothing`, `triplet_weight`, ...).

    Returns:
        A compiled-ready `keras.Model`; `model.compile(optimizer=...)` is all it needs.

    Example:

    >>> model = create_model("macnn", num_classes=200, backbone="vgg19", image_size=448,
    ...                      weights="imagenet", num_parts=4)
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}. Valid models: {', '.join(list_models())}")
    family = MODELS[name]
    if second_backbone is not None:
        if name not in ("bcnn", "dasrbn"):
            raise ValueError(
                f"`second_backbone` applies to 'bcnn' and 'dasrbn' only. Received: model={name!r}"
            )
        second_weights = weights if weights == "imagenet" else None
        options["second_backbone"] = create_backbone(
            second_backbone, weights=second_weights, image_size=image_size, name_prefix="second_"
        )
    if part_crop_size is not None:
        if name != "macnn":
            raise ValueError(f"`part_crop_size` applies to 'macnn' only. Received: model={name!r}")
        options["part_backbone"] = create_backbone(
            backbone,
            weights=weights,
            image_size=part_crop_size,
            feature_layer=feature_layer,
            name_prefix="part_",
        )
    two_depths = (
        name == "dasrbn" and second_backbone is None and has_earlier_feature_layer(backbone)
    )
    features = create_backbone(
        backbone,
        weights=weights,
        image_size=image_size,
        feature_layer=feature_layer,
        last_stride=last_stride,
        earlier_feature_layer="default" if two_depths else None,
    )
    return family(features, num_classes, name=f"{name}_{backbone_label(backbone)}", **options)
