"""The Keras internals keras_fg relies on (keras_fg/models/keras_internals.py) still work.

If one of these fails after a Keras upgrade, the named helper must be rewritten for it.
"""

import keras
import numpy as np

from keras_fg.models import create_model
from keras_fg.models.keras_internals import call_site_output, detach_from_distribution_strategy


def test_call_site_output_is_the_backbone_output_inside_the_model():
    model = create_model("gap", 3, backbone="tiny", image_size=32)
    tensor = call_site_output(model.backbone)
    assert tensor is not model.backbone.output, "call_site_output: Keras changed layer nodes"
    # The tensor belongs to the model's graph: a model from it to the outputs can be built.
    head = keras.Model(tensor, model.output["logits"])
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        head.predict(model.backbone.predict(images, verbose=0), verbose=0),
        model.predict(images, verbose=0)["logits"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_detach_from_distribution_strategy_leaves_the_default_strategy():
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = create_model("gap", 3, backbone="tiny", image_size=32)
    assert model.distribute_strategy is strategy
    detach_from_distribution_strategy(model)
    assert model.distribute_strategy is tf.distribute.get_strategy(), (
        "detach_from_distribution_strategy: Keras no longer reads `_distribute_strategy`"
    )
    model.predict(np.zeros((1, 32, 32, 3), "float32"), verbose=0)
