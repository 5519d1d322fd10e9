"""Keras model builders: the VGG16 conv base, the top MLP, the small CNN, and their joins.

Pixel normalisation lives inside the models (a built-in ``Normalization`` or ``Rescaling``
layer), so every model takes plain 0..255 RGB arrays from ``pipeline.images.decode``, a saved model
carries its own preprocessing, and plain Keras loads it without this project.
"""

from __future__ import annotations

from typing import Callable, Sequence

import keras
import numpy as np

from pipeline.nets.precision import dtype_policy
from pipeline.nets.vgg16 import BLOCK5_CONVS

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
PREPROCESSING_MODES = ("torch", "caffe", "unit")


def preprocessing_layer(mode: str) -> keras.layers.Layer:
    """0..255 RGB pixels to what a network's weights expect, as a built-in float32 Keras layer: ``torch``, /255
    then ImageNet mean/std (torchvision weights); ``caffe``, minus the ImageNet mean (Keras' weights, whose first
    convolution ``load_weight_arrays`` turns from BGR to RGB: no flip here); ``unit``, /255 (the small CNN)."""
    if mode == "torch":
        return keras.layers.Normalization(mean=[m * 255.0 for m in IMAGENET_MEAN_RGB],
                                          variance=[(s * 255.0) ** 2 for s in IMAGENET_STD_RGB],
                                          dtype="float32", name="preprocessing")
    if mode == "caffe":
        return keras.layers.Normalization(mean=list(CAFFE_MEAN_BGR[::-1]), variance=[1.0, 1.0, 1.0], dtype="float32",
                                          name="preprocessing")
    if mode == "unit":
        return keras.layers.Rescaling(1.0 / 255.0, dtype="float32", name="preprocessing")
    raise ValueError(f"mode must be one of {PREPROCESSING_MODES}; got {mode!r}")


def vgg16_conv_base(image_size: int, weights: str | None = None) -> keras.Model:
    """``keras.applications.VGG16`` without its top; ``weights`` is None or a Keras weights file."""
    return keras.applications.VGG16(include_top=False, weights=weights, input_shape=(image_size, image_size, 3))


def feature_extractor(image_size: int, weight_arrays: Sequence[np.ndarray] | None, preprocessing: str,
                      precision: str = "float32") -> keras.Model:
    """0..255 RGB images → VGG16 bottleneck features, with the weights' preprocessing inside."""
    with dtype_policy(precision):
        base = _vgg16_with_weights(image_size, weight_arrays)
        inputs = keras.Input((image_size, image_size, 3), name="image")
        outputs = base(preprocessing_layer(preprocessing)(inputs))
        return keras.Model(inputs, outputs, name="vgg16_features")


def block4_and_features(image_size: int, weight_arrays: Sequence[np.ndarray] | None, preprocessing: str,
                        precision: str = "float32") -> keras.Model:
    """0..255 RGB images → (VGG16's block-4 output, bottleneck features), with the weights'
    preprocessing inside: what an extraction with the block-4 cache runs."""
    with dtype_policy(precision):
        base = _vgg16_with_weights(image_size, weight_arrays)
        block4 = keras.Model(base.input, base.get_layer("block4_pool").output, name="vgg16_blocks1to4")
        inputs = keras.Input((image_size, image_size, 3), name="image")
        b4 = block4(preprocessing_layer(preprocessing)(inputs))
        x = b4
        for name in (*BLOCK5_CONVS, "block5_pool"):
            x = base.get_layer(name)(x)
        return keras.Model(inputs, [b4, x], name="vgg16_block4_and_features")


def _vgg16_with_weights(image_size: int, weight_arrays: Sequence[np.ndarray] | None) -> keras.Model:
    base = vgg16_conv_base(image_size)
    if weight_arrays is not None:
        base.set_weights(list(weight_arrays))
    return base


def block5_classifier(block4_shape: Sequence[int], num_classes: int, precision: str = "float32",
                      dropout: float = 0.5, dropout_layer: Callable = keras.layers.Dropout) -> keras.Model:
    """Block-4 outputs → VGG16's block 5 → the top MLP: what fine-tuning on cached block-4 outputs trains (the
    block-5 layers carry VGG16's names, so ``copy_block5`` moves their weights to and from a feature extractor)."""
    with dtype_policy(precision):
        inputs = keras.Input(tuple(block4_shape), name="block4")
        x = inputs
        for name in BLOCK5_CONVS:
            x = keras.layers.Conv2D(512, (3, 3), activation="relu", padding="same", name=name)(x)
        x = keras.layers.MaxPooling2D((2, 2), strides=(2, 2), name="block5_pool")(x)
        block5 = keras.Model(inputs, x, name="vgg16_block5")
        top = top_classifier(block5.output_shape[1:], num_classes, precision, dropout, dropout_layer)
        return keras.Model(inputs, top(block5(inputs)), name="vgg16_block5_top")


def _layers(model: keras.Model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _layers(layer)


def block5_weights(model: keras.Model) -> list[np.ndarray]:
    """The kernels and biases of VGG16's block-5 convolutions in ``model`` (found at any nesting depth)."""
    layers = {layer.name: layer for layer in _layers(model)}
    return [w for name in BLOCK5_CONVS for w in layers[name].get_weights()]


def copy_block5(source: keras.Model, target: keras.Model) -> None:
    """Set ``target``'s block-5 convolutions to ``source``'s."""
    weights = block5_weights(source)
    layers = {layer.name: layer for layer in _layers(target)}
    for i, name in enumerate(BLOCK5_CONVS):
        layers[name].set_weights(weights[2 * i:2 * i + 2])


def freeze_below_block5(features_model: keras.Model) -> None:
    """Blocks 1–4 of the VGG16 inside ``features_model`` frozen, block 5 trainable."""
    vgg = features_model.get_layer("vgg16")
    for layer in vgg.layers:
        layer.trainable = layer.name.startswith("block5")


def _dense_head(x, units: int, num_classes: int, dropout: float, dropout_layer: Callable):
    """What both of the article's models end with: Flatten → Dense(``units``, relu) → dropout → the output layer,
    one sigmoid unit for two classes, a softmax for more, float32 always."""
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(units, activation="relu", name="fc1")(x)
    x = dropout_layer(dropout, name="dropout")(x)
    outputs, activation = (1, "sigmoid") if num_classes == 2 else (num_classes, "softmax")
    return keras.layers.Dense(outputs, activation=activation, dtype="float32", name="predictions")(x)


def top_classifier(input_shape: Sequence[int], num_classes: int, precision: str = "float32",
                   dropout: float = 0.5, dropout_layer: Callable = keras.layers.Dropout) -> keras.Model:
    """The reference article's top: Flatten → Dense(256, relu) → Dropout(0.5) → class head.
    ``dropout_layer``: the training workers' ``GlobalDropout`` (no weights: a model built with
    either takes the other's weights)."""
    with dtype_policy(precision):
        inputs = keras.Input(tuple(input_shape), name="features")
        return keras.Model(inputs, _dense_head(inputs, 256, num_classes, dropout, dropout_layer), name="top")


def scratch_cnn(image_size: int, num_classes: int, precision: str = "float32", dropout: float = 0.5,
                dropout_layer: Callable = keras.layers.Dropout) -> keras.Model:
    """The reference article's small CNN: Conv 32-32-64 with ReLU and max-pooling, Dense 64, Dropout 0.5."""
    with dtype_policy(precision):
        inputs = keras.Input((image_size, image_size, 3), name="image")
        x = preprocessing_layer("unit")(inputs)
        for i, filters in enumerate((32, 32, 64), start=1):
            x = keras.layers.Conv2D(filters, 3, activation="relu", name=f"conv{i}")(x)
            x = keras.layers.MaxPooling2D(2, name=f"pool{i}")(x)
        return keras.Model(inputs, _dense_head(x, 64, num_classes, dropout, dropout_layer), name="scratch_cnn")


def image_classifier(features: keras.Model, top: keras.Model, name: str = "vgg16_classifier") -> keras.Model:
    """Images → classes: the feature extractor and the top joined into one model."""
    inputs = keras.Input(features.input_shape[1:], name="image")
    return keras.Model(inputs, top(features(inputs)), name=name)


def probabilities(outputs: np.ndarray, num_classes: int) -> np.ndarray:
    """Model outputs as an ``(n, num_classes)`` probability matrix (a sigmoid unit is P(class 1))."""
    outputs = np.asarray(outputs, dtype=np.float32)
    if num_classes == 2 and outputs.shape[-1] == 1:
        return np.concatenate([1.0 - outputs, outputs], axis=1)
    return outputs
