"""The kinds of model the training jobs make: how each is built and fed, its optimizer, title and the
reference article's figure. ``KINDS`` is keyed by the job's folder, so fine-tuning has two entries
(``finetune`` on cached block-4 outputs, ``finetune_streamed`` on images), both of model kind ``finetune``.
Only workers build models, and this module stays light to import: the training loop (worker-only, Keras at
its top; Keras takes seconds to load) hands the builders ``pipeline.nets.models`` and its dropout layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from pipeline.data.shards import list_rows
from pipeline.images.augment import Augmentation, augment_batch, shift_maps
from pipeline.training.settings import LoopSettings


def block4_cells(shift: float, image_size: int) -> int:
    """``shift`` (a fraction of the image's side) in whole cells of VGG16's block-4 map (16 px each)."""
    return int(round(shift * image_size / 16))


def _float_rows(column, n: int, shape: tuple[int, ...]) -> np.ndarray:
    """A fixed-size-list column (pyarrow, or numpy rows) as a writable ``(n, *shape)`` float32 array."""
    if hasattr(column, "combine_chunks"):  # pyarrow
        flat = list_rows(column)
    elif isinstance(column, np.ndarray) and column.dtype != object:  # rows held in memory
        flat = column
    else:
        flat = np.stack(column)
    return np.array(flat, dtype=np.float32).reshape(n, *shape)


def _features(batch: dict[str, Any], s: LoopSettings, rng: np.random.Generator | None) -> np.ndarray:
    """The top MLP's input: the VGG16 features as stored, never augmented."""
    return _float_rows(batch["features"], len(batch["label"]), s.feature_shape)


def _block4(batch: dict[str, Any], s: LoopSettings, rng: np.random.Generator | None) -> np.ndarray:
    """Cached fine-tuning's input: block-4 maps; augmented, a random half mirrored, then shifted by whole cells."""
    n = len(batch["label"])
    x = _float_rows(batch["block4"], n, s.block4_shape)
    if rng is not None:
        mirrored = rng.random(n) < 0.5
        x[mirrored] = _float_rows(batch["block4_flipped"], n, s.block4_shape)[mirrored]
        x = shift_maps(x, rng, block4_cells(s.shift, s.image_size))
    return x


def _images(batch: dict[str, Any], s: LoopSettings, rng: np.random.Generator | None) -> np.ndarray:
    """The image models' input: decoded images, augmented when ``rng`` is given."""
    images = np.asarray(batch["image"])
    aug = Augmentation(rotation=s.rotation, shift=s.shift)
    return augment_batch(images, rng, aug) if rng is not None else images.astype(np.float32)


def _top_mlp(models, dropout_layer, s: LoopSettings, base_weights, top_weights):
    return models.top_classifier(s.feature_shape, s.num_classes, s.precision, s.dropout, dropout_layer)


def _block5_and_top(models, dropout_layer, s: LoopSettings, base_weights, top_weights):
    model = models.block5_classifier(s.block4_shape, s.num_classes, s.precision, s.dropout, dropout_layer)
    if base_weights is not None:
        model.get_layer("vgg16_block5").set_weights(base_weights)
    if top_weights is not None:
        model.get_layer("top").set_weights(top_weights)
    return model


def _vgg16_and_top(models, dropout_layer, s: LoopSettings, base_weights, top_weights):
    features = models.feature_extractor(s.image_size, base_weights, s.preprocessing, s.precision)
    models.freeze_below_block5(features)
    top = models.top_classifier(features.output_shape[1:], s.num_classes, s.precision, s.dropout, dropout_layer)
    if top_weights is not None:
        top.set_weights(top_weights)
    return models.image_classifier(features, top, name="vgg16_finetuned")


def _small_cnn(models, dropout_layer, s: LoopSettings, base_weights, top_weights):
    return models.scratch_cnn(s.image_size, s.num_classes, s.precision, s.dropout, dropout_layer)


@dataclass(frozen=True)
class Kind:
    """One kind of training: how its model is built and fed, and how it is named."""

    name: str  # the model's kind, as a model file records it: top, finetune or scratch
    folder: str  # its job's folder under <output-dir>, its key in KINDS
    title: str  # in curves and report.md
    reference: str  # the reference article's validation accuracy
    # The model under training, from pipeline.nets.models, a dropout layer, the settings and optional starting
    # weights (base, top); under the current strategy scope.
    build: Callable[[Any, Any, LoopSettings, Any, Any], Any]
    # A batch's model input, augmented when given a generator.
    inputs: Callable[[dict[str, Any], LoopSettings, np.random.Generator | None], np.ndarray]
    columnar: bool  # batches of Arrow columns (features, block-4 maps), not numpy images
    # A worker's private memory apart from the data it holds (TensorFlow, Ray, the model and optimizer, a
    # streamed epoch's buffers), in GiB: at least every peak bench/train_memory.py measured for the kind
    # (bench/results/train_memory*.json; tests/test_memory_rule.py checks), with a margin.
    worker_fixed_gib: float
    # The reference article's optimizers: rmsprop (Keras' default 1e-3) but SGD 1e-4 for fine-tuning.
    optimizer: str = "rmsprop"
    learning_rate: float = 1e-3


FINETUNED = "VGG16 fine-tuned (block 5 + top)"
FINETUNE_FIXED_GIB = 2.4
KINDS = {kind.folder: kind for kind in (
    Kind("top", "top", "VGG16 bottleneck + top MLP", "0.90–0.91", _top_mlp, _features, columnar=True,
         worker_fixed_gib=1.4),
    # Cached block-4 outputs are fine-tuning's default; the streamed mode is the one named.
    Kind("finetune", "finetune", FINETUNED, "0.94", _block5_and_top, _block4, columnar=True,
         worker_fixed_gib=FINETUNE_FIXED_GIB, optimizer="sgd", learning_rate=1e-4),
    # Not measured apart (bench/train_memory.py runs the default mode): taken as the cached mode's.
    Kind("finetune", "finetune_streamed", FINETUNED + ", streamed images", "0.94", _vgg16_and_top, _images,
         columnar=False, worker_fixed_gib=FINETUNE_FIXED_GIB, optimizer="sgd", learning_rate=1e-4),
    Kind("scratch", "scratch", "small CNN from scratch", "0.79–0.81", _small_cnn, _images, columnar=False,
         worker_fixed_gib=0.75),
)}


def kind_of(name: str, cached_block4: bool = False) -> Kind:
    """The entry of the model kind ``name`` (fine-tuning's: that of its mode)."""
    return KINDS["finetune_streamed" if name == "finetune" and not cached_block4 else name]
