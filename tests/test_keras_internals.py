"""The Keras internals keras_fg relies on (keras_fg/models/keras_internals.py) still work.

If one of these fails after a Keras upgrade, the named helper must be rewritten for it.
"""

import keras
import numpy as np

from keras_fg.models import create_model
from keras_fg.models.keras_internals import (
    call_site_input,
    call_site_output,
    detach_from_distribution_strategy,
    producing_layer,
)


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


def test_call_site_input_is_the_tensor_the_enclosing_model_fed_the_backbone():
    model = create_model("gap", 3, backbone="tiny", image_size=32)
    tensor = call_site_input(model.backbone)
    assert tensor is not model.backbone.input, "call_site_input: Keras changed layer nodes"
    # The tensor belongs to the model's graph: the model's input reaches it.
    probe = keras.Model(model.input, tensor)
    images = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(probe.predict(images, verbose=0), images, rtol=1e-6)


def test_producing_layer_is_the_layer_that_wrote_a_tensor():
    model = create_model("gap", 3, backbone="tiny", image_size=32)
    for name in ("logits", "probabilities"):
        layer = producing_layer(model.output[name])
        assert layer in model.layers, "producing_layer: Keras changed `_keras_history`"
        assert layer.output is model.output[name]
