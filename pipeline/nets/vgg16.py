"""VGG16's conv-base geometry, without Keras: layer names, kernel shapes and output shapes.

Kept free of TensorFlow so the driver of a job can size and check things without paying
TensorFlow's start-up (seconds) when only the remote actors run the network.
"""

from __future__ import annotations

# (layer name, input channels, output channels) of the 13 3x3 convolutions, in order.
CONVS = (
    ("block1_conv1", 3, 64), ("block1_conv2", 64, 64),
    ("block2_conv1", 64, 128), ("block2_conv2", 128, 128),
    ("block3_conv1", 128, 256), ("block3_conv2", 256, 256), ("block3_conv3", 256, 256),
    ("block4_conv1", 256, 512), ("block4_conv2", 512, 512), ("block4_conv3", 512, 512),
    ("block5_conv1", 512, 512), ("block5_conv2", 512, 512), ("block5_conv3", 512, 512),
)
BLOCK5_CONVS = tuple(name for name, _, _ in CONVS if name.startswith("block5"))


def feature_shape(image_size: int) -> tuple[int, int, int]:
    """VGG16's block-5 output (the bottleneck features) for square inputs of ``image_size`` pixels (5 poolings)."""
    return (image_size // 32, image_size // 32, 512)


def block4_shape(image_size: int) -> tuple[int, int, int]:
    """VGG16's block-4 output (the input of block 5) for square inputs of ``image_size`` pixels (4 poolings)."""
    return (image_size // 16, image_size // 16, 512)
