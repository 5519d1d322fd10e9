"""Typed job settings and the one way each job turns a command line into them.

Every job has a dataclass whose fields are its options. ``field_help`` attaches the
help text and, where the values are a closed set, the allowed choices; ``parse_config``
builds an ``argparse`` parser from the dataclass so ``--help`` lists every option and
``__post_init__`` validation runs before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, Sequence, TypeVar

from pipeline.data import storage
from pipeline.errors import ConfigError, UserError
from pipeline.images.decode import MAX_IMAGE_MEGAPIXELS, PILLOW_LIMIT_MEGAPIXELS
from pipeline.nets.modelfile import read_metadata
from pipeline.redact import redact

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
PREPROCESSINGS = ("auto", "torch", "caffe")
NAMED_WEIGHTS = ("torchvision", "keras", "none")
LAYOUTS = ("splits", "kaggle")
SKIPPABLE = ("finetune", "scratch")
# VGG16 sees images at the size it was trained on (ImageNet's 224 px): its features there beat
# 150 px ones by about a point of the top MLP's accuracy on cats_vs_dogs_small (docs/performance.md, Accuracy).
# The small CNN keeps the reference article's 150 px.
VGG16_IMAGE_SIZE = 224
SCRATCH_IMAGE_SIZE = 150
# The small CNN's defaults go past the article's (batch 32, 50 epochs, shear, zoom and flips
# only), as Chollet's later book does: twice the steps per epoch, twice the epochs, rotations
# and shifts as well (docs/performance.md, Accuracy).
SCRATCH_EPOCHS = 100
SCRATCH_BATCH_SIZE = 16
SCRATCH_ROTATION = 20.0
SCRATCH_SHIFT = 0.1
# Fine-tuning's shifts: 0.15 of 224 px is 2 cells of the block-4 map that cached fine-tuning shifts.
FINETUNE_SHIFT = 0.15

T = TypeVar("T")


def field_help(default: Any, help: str, choices: Sequence[str] | None = None, **kw: Any) -> Any:
    """A dataclass field carrying its CLI help text and allowed choices."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices}, **kw)


def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    """Raise ConfigError naming the allowed values when ``value`` is not one of them."""
    if value not in allowed:
        raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}; got {value!r}")


def check_positive(name: str, value: float | None, allow_none: bool = False) -> None:
    """Raise ConfigError unless ``value`` is > 0 (or None when allowed)."""
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ConfigError(f"--{name.replace('_', '-')} must be a positive number; got {value!r}")


def check_range(name: str, value: float, low: float, high: float, open_low: bool = False, open_high: bool = False) -> None:
    """Raise ConfigError unless ``value`` lies between ``low`` and ``high``."""
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    if not (above and below):
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ConfigError(f"--{name.replace('_', '-')} must be in {interval}; got {value!r}")


def check_output_location(name: str, value: str | None) -> None:
    """Refuse an output location that is an existing regular file, or on a bucket that does not exist."""
    if not value:
        return
    problem = storage.describe_output_problem(value)
    if problem:
        raise ConfigError(f"--{name.replace('_', '-')} {value!r} cannot be written: {problem}")
    if storage.is_file(value):
        raise ConfigError(f"--{name.replace('_', '-')} must be a folder, but {value!r} is an existing file")


def check_input_location(name: str, value: str | None, want: str = "folder") -> None:
    """Refuse an input location (local path or URI) that is missing, of the wrong kind or unreadable."""
    problem = storage.describe_problem(value, want) if value is not None else None
    if problem:
        raise ConfigError(f"--{name.replace('_', '-')} {value!r} cannot be used: {problem}")


def check_workers_divide_batch(num_workers: int, batch_size: int, option: str = "--batch-size") -> None:
    """Every Ray Train worker takes an equal share of each global batch, so N workers step exactly
    like one: refuse a worker count that does not divide the batch, naming the nearest that do."""
    if batch_size % num_workers == 0:
        return
    divisors = [n for n in range(1, batch_size + 1) if batch_size % n == 0]
    nearest = [max(n for n in divisors if n < num_workers)] + [n for n in divisors if n > num_workers][:1]
    batches = [b for b in (batch_size - batch_size % num_workers, batch_size + num_workers - batch_size % num_workers) if b > 0]
    raise ConfigError(f"--num-workers {num_workers} does not divide {option} {batch_size} (each worker takes an "
                      f"equal share of every batch): use --num-workers {' or '.join(map(str, nearest))}, or "
                      f"{option} {' or '.join(map(str, batches))}")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """The non-None member of ``Optional[X]`` and whether None was allowed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def build_parser(cls: type, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one option per dataclass field of ``cls``."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if choices:
            help_text += f" (one of: {', '.join(choices)})"
        if f.default is dataclasses.MISSING:
            parser.add_argument(flag, type=tp, required=True, help=help_text, metavar=f.name.upper())
        elif tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            # choices are checked in __post_init__ so that every invalid value, from
            # the CLI or from Python, gets the same message.
            parser.add_argument(flag, type=tp, default=f.default, help=help_text, metavar=f.name.upper())
    return parser


def parse_config(cls: type[T], argv: Sequence[str] | None, description: str) -> T:
    """Parse ``argv`` into ``cls``; invalid values exit with status 2 and a message."""
    parser = build_parser(cls, description)
    args = parser.parse_args(argv)
    try:
        return cls(**vars(args))
    except UserError as exc:
        parser.error(redact(str(exc)))
        raise  # unreachable: parser.error exits


@dataclasses.dataclass
class LogOptions:
    """What a job prints (shared by every job)."""

    verbose: bool = field_help(False, "print everything: TensorFlow's start-up logs and Ray Train's and Ray Data's "
                                      "bookkeeping from every process (default: the project's messages, Ray Data's "
                                      "progress bars and one line per training epoch)", kw_only=True)




@dataclasses.dataclass
class DecodeOptions:
    """How image files are decoded (shared by every job that decodes images)."""

    max_image_megapixels: float = field_help(MAX_IMAGE_MEGAPIXELS, "images whose header declares more pixels than "
                                                                   "this are rejects (reason 'too large'), never "
                                                                   "decoded: it bounds a decode's memory",
                                             kw_only=True)

    def check_decode_options(self) -> None:
        """Validate the decoding options (called from each job config's ``__post_init__``)."""
        check_range("max_image_megapixels", self.max_image_megapixels, 0, PILLOW_LIMIT_MEGAPIXELS, open_low=True)

    @property
    def max_pixels(self) -> int:
        """``--max-image-megapixels`` in pixels, as ``pipeline.images.decode`` takes it."""
        return round(self.max_image_megapixels * 1_000_000)


@dataclasses.dataclass
class DataOptions(DecodeOptions):
    """Where the labelled images are and how they are read (shared by every job that reads a data root)."""

    data_dir: str | None = field_help(None, "data root (default: the built-in synthetic set, which proves the installation "
                                            "only; fine-tuning: the data of its top model)")
    layout: str = field_help("splits", "splits: <root>/<split>/<class>/<image>; kaggle: flat <root>/cat.1.jpg", LAYOUTS)
    validation_fraction: float = field_help(0.2, "fraction of files hashed into validation (kaggle layout)")
    max_images_per_class: int | None = field_help(None, "use at most this many images per class and split (smoke tests)")
    max_reject_fraction: float = field_help(0.05, "fail if more than this fraction of files cannot be decoded")
    exclude: str | None = field_help(None, "a text file of photos to leave out, one path a line relative to the "
                                           "data root (train/cats/cat.1.jpg), as the suspects.txt of "
                                           "jobs.audit_data lists them")

    def check_data_options(self) -> None:
        """Validate the data options (called from each job config's ``__post_init__``)."""
        check_choice("layout", self.layout, LAYOUTS)
        check_range("validation_fraction", self.validation_fraction, 0, 1, open_low=True, open_high=True)
        check_positive("max_images_per_class", self.max_images_per_class, allow_none=True)
        check_range("max_reject_fraction", self.max_reject_fraction, 0, 1)
        self.check_decode_options()
        check_input_location("data_dir", self.data_dir)
        check_input_location("exclude", self.exclude, "file")


# 128 files: a few MB of decoded pixels per block at 150 px (Ray Data's blocks are happiest
# between 1 and 128 MB), about 8,000 blocks at a million files, and at most 128 files of
# work lost per block in flight when a run is killed.
DEFAULT_BLOCK_FILES = 128


@dataclasses.dataclass
class InferenceOptions:
    """How the VGG16 / classifier actor pool of extraction and prediction is sized and run."""

    precision: str = field_help("auto", "auto: decided by each inference actor from its device: bfloat16 on GPUs of "
                                        "compute capability >= 8.0 and on bf16 CPUs, float16 on older GPUs, "
                                        "else float32", PRECISIONS, kw_only=True)
    workers: int = field_help(1, "inference actors when the cluster has no GPUs and --gpus is not given",
                              kw_only=True)
    gpus: int | None = field_help(None, "run this many one-GPU inference actors, asking the cluster (its autoscaler) "
                                        "for the GPUs even when none is up yet; default: one per GPU present, "
                                        "else --workers CPU actors", kw_only=True)
    gpu_wait_s: float = field_help(900.0, "with --gpus: how long to wait for the GPUs to join the cluster",
                                   kw_only=True)
    batch_size: int = field_help(32, "images per inference batch", kw_only=True)
    block_files: int = field_help(DEFAULT_BLOCK_FILES, "files per block: decoded, run and committed together "
                                                       "(an interrupted run redoes at most the blocks in flight)",
                                  kw_only=True)

    def check_inference_options(self) -> None:
        """Validate the inference options (called from each job config's ``__post_init__``)."""
        check_choice("precision", self.precision, PRECISIONS)
        check_positive("workers", self.workers)
        check_positive("gpus", self.gpus, allow_none=True)
        check_positive("gpu_wait_s", self.gpu_wait_s)
        check_positive("batch_size", self.batch_size)
        check_positive("block_files", self.block_files)


EMA_HELP = ("momentum of the moving average of the weights that every epoch's evaluation, the checkpoints and the "
            "exported model use (lowered so that it spans at most the last tenth of the run's steps); 0: the trained "
            "weights themselves")


@dataclasses.dataclass
class ExtractConfig(InferenceOptions, DataOptions, LogOptions):
    """Settings of ``jobs.extract_features``: image folders → VGG16 bottleneck features in Parquet."""

    output_dir: str | None = field_help(None, "where the shards go (local path or URI); default outputs/<data folder name>/features")
    image_size: int = field_help(VGG16_IMAGE_SIZE, "images are resized to this many pixels square (at least 32)")
    weights: str = field_help("torchvision", "VGG16 weights: torchvision, keras, none, or a path to a Keras weights file")
    preprocessing: str = field_help("auto", "pixel normalisation; auto follows the weights", PREPROCESSINGS)
    cache_block4: bool = field_help(False, "also write VGG16's block-4 outputs (training images: also of their mirror "
                                           "image) under <output-dir>/block4/, for jobs.finetune --cache-block4")
    overwrite: bool = field_help(False, "redo the extraction even if a finished one with the same settings exists")

    def __post_init__(self) -> None:
        self.check_data_options()
        if self.image_size is None or self.image_size < 32:
            raise ConfigError(f"--image-size must be an integer of at least 32 (VGG16 halves it five times); got {self.image_size!r}")
        check_weights(self.weights)
        check_choice("preprocessing", self.preprocessing, PREPROCESSINGS)
        self.check_inference_options()
        check_output_location("output_dir", self.output_dir)


def check_weights(value: str) -> None:
    """``--weights`` is one of the named sources or an existing file."""
    if value not in NAMED_WEIGHTS and not os.path.isfile(value):
        raise ConfigError(
            f"--weights must be one of {', '.join(NAMED_WEIGHTS)} or a path to a Keras weights file; got {value!r}"
        )


MLFLOW_URI_HELP = ("log each training job to this MLflow tracking store (needs the mlflow extra); default: "
                   "MLFLOW_TRACKING_URI, and no tracking when neither is set")
DEFAULT_EXPERIMENT = "ray-image-classifier"


@dataclasses.dataclass
class TrainConfig(LogOptions):
    """Settings shared by the three training jobs."""

    output_dir: str | None = field_help(None, "run folder; the job writes <output-dir>/<job>/ (default outputs/<data folder name>)")
    num_workers: int = field_help(1, "Ray Train workers (data-parallel replicas)")
    use_gpu: bool = field_help(False, "put each Ray Train worker on a GPU")
    epochs: int = field_help(50, "training epochs")
    batch_size: int = field_help(32, "global batch size (split evenly across workers)")
    learning_rate: float | None = field_help(None, "default: rmsprop 1e-3 (top, scratch), SGD 1e-4 (finetune)")
    dropout: float = field_help(0.5, "dropout rate before the output layer")
    ema_momentum: float = field_help(0.995, EMA_HELP)
    seed: int = field_help(0, "seed for initialisation, shuffling and augmentation")
    precision: str = field_help("auto", "auto: mixed bfloat16 where the hardware has it", PRECISIONS)
    max_failures: int = field_help(2, "worker-group restarts (from the last checkpoint) before giving up")
    overwrite: bool = field_help(False, "retrain even if this job already finished in the output folder")
    mlflow_uri: str | None = field_help(None, MLFLOW_URI_HELP)
    mlflow_experiment: str = field_help(DEFAULT_EXPERIMENT, "MLflow experiment the run is logged to")

    def __post_init__(self) -> None:
        check_positive("num_workers", self.num_workers)
        check_positive("epochs", self.epochs)
        check_positive("batch_size", self.batch_size)
        check_workers_divide_batch(self.num_workers, self.batch_size)
        check_positive("learning_rate", self.learning_rate, allow_none=True)
        check_range("dropout", self.dropout, 0, 1, open_high=True)
        check_range("ema_momentum", self.ema_momentum, 0, 1, open_high=True)
        check_choice("precision", self.precision, PRECISIONS)
        if self.max_failures is None or self.max_failures < 0:
            raise ConfigError(f"--max-failures must be 0 or more; got {self.max_failures!r}")
        check_output_location("output_dir", self.output_dir)


@dataclasses.dataclass
class TrainTopConfig(TrainConfig):
    """Settings of ``jobs.train_top``: the top MLP on VGG16 feature shards."""

    features_dir: str | None = field_help(None, "output of jobs.extract_features; default: extract the built-in data set first")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_input_location("features_dir", self.features_dir)


ROTATION_HELP = ("the small CNN's augmentation: random rotation within ± this many degrees (on top of the reference "
                 "article's shear 0.2, zoom 0.2 and horizontal flip); 0: none")
SHIFT_HELP = ("augmentation: random shift within ± this fraction of the image's side, each axis drawn on its own "
              "(cached fine-tuning shifts the block-4 map by the nearest whole number of its 16-pixel cells); "
              "0: none")


@dataclasses.dataclass
class ImageTrainConfig(DataOptions, TrainConfig):
    """Settings shared by the jobs that stream images (fine-tuning, the small CNN)."""

    shift: float = field_help(0.0, SHIFT_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_data_options()
        check_range("shift", self.shift, 0, 1, open_high=True)


CACHE_BLOCK4_HELP = ("train block 5 + top on cached block-4 outputs of the top model's feature folder (added there "
                     "if missing; augmentation: mirror images and --shift), which runs blocks 1-4 once per image instead of every "
                     "epoch; --no-cache-block4 streams the images through all of VGG16 every epoch, with the "
                     "article's shear and zoom as well as flips and --shift, and writes "
                     "<output-dir>/finetune_streamed/")


@dataclasses.dataclass
class FinetuneConfig(ImageTrainConfig):
    """Settings of ``jobs.finetune``: VGG16 block 5 + top, initialised from a train_top result."""

    epochs: int = field_help(10, "training epochs")
    shift: float = field_help(FINETUNE_SHIFT, SHIFT_HELP)
    top_model: str | None = field_help(None, "model.keras written by jobs.train_top (default <output-dir>/top/model.keras)")
    cache_block4: bool = field_help(True, CACHE_BLOCK4_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_input_location("top_model", self.top_model, "file")
        if self.cache_block4 and (self.data_dir is not None or self.max_images_per_class is not None
                                  or self.exclude is not None):
            raise ConfigError("--cache-block4 (the default) trains on the images the top model's features were "
                              "extracted from; to fine-tune on --data-dir, --max-images-per-class or --exclude, add "
                              "--no-cache-block4 (or extract that data with jobs.extract_features --cache-block4, "
                              "which takes --exclude too, and train a top model on it)")


@dataclasses.dataclass
class ScratchConfig(ImageTrainConfig):
    """Settings of ``jobs.train_scratch``: the small CNN trained from scratch with augmentation."""

    epochs: int = field_help(SCRATCH_EPOCHS, "training epochs")
    batch_size: int = field_help(SCRATCH_BATCH_SIZE, "global batch size (split evenly across workers)")
    image_size: int = field_help(SCRATCH_IMAGE_SIZE, "images are resized to this many pixels square (at least 32)")
    rotation: float = field_help(SCRATCH_ROTATION, ROTATION_HELP)
    shift: float = field_help(SCRATCH_SHIFT, SHIFT_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size is None or self.image_size < 32:
            raise ConfigError(f"--image-size must be an integer of at least 32; got {self.image_size!r}")
        check_range("rotation", self.rotation, 0, 180)


# Options whose defaults differ between the training jobs: run_all has one per job, named
# with the job's prefix (--top-epochs, --finetune-learning-rate, ...).
RUN_ALL_STAGES = ("top", "finetune", "scratch")
PER_STAGE_OPTIONS = ("epochs", "learning_rate")
# Options of the jobs that train on images only (run_all: --finetune-shift, --scratch-shift).
IMAGE_STAGES = ("finetune", "scratch")
IMAGE_STAGE_OPTIONS = ("shift",)


@dataclasses.dataclass
class RunAllConfig(DataOptions, LogOptions):
    """Settings of ``jobs.run_all``: extraction → train_top → finetune → train_scratch → report.md.

    It offers every option of its stages (``tests/test_config.py`` checks it): the shared
    ones once, and those whose defaults differ between the training jobs once per job.
    """

    output_dir: str | None = field_help(None, "run folder (default outputs/<data folder name>)")
    image_size: int = field_help(VGG16_IMAGE_SIZE, "VGG16's input: images are resized to this many pixels square "
                                                   "for extraction (the top MLP and fine-tuning follow it)")
    scratch_image_size: int = field_help(SCRATCH_IMAGE_SIZE, "the small CNN's input size in pixels (train_scratch "
                                                             "--image-size)")
    weights: str = field_help("torchvision", "VGG16 weights: torchvision, keras, none, or a Keras weights file")
    preprocessing: str = field_help("auto", "pixel normalisation; auto follows the weights", PREPROCESSINGS)
    precision: str = field_help("auto", "auto: bfloat16 where the hardware has it, else float32", PRECISIONS)
    workers: int = field_help(1, "extraction: inference actors when the cluster has no GPUs and --gpus is not given")
    gpus: int | None = field_help(None, "extraction: one-GPU inference actors to ask the cluster for (see "
                                        "jobs.extract_features --gpus)")
    gpu_wait_s: float = field_help(900.0, "with --gpus: how long to wait for the GPUs to join the cluster")
    block_files: int = field_help(DEFAULT_BLOCK_FILES, "extraction: files per block, decoded, run and committed together")
    num_workers: int = field_help(1, "Ray Train workers for each training job")
    use_gpu: bool = field_help(False, "put each Ray Train worker on a GPU")
    epochs: int | None = field_help(None, "epochs for every training job unless --top-epochs etc. say otherwise "
                                          "(default: each job's own, 50, 10 and 100; 5 on the built-in data)")
    top_epochs: int | None = field_help(None, "train_top epochs (default --epochs, else the job's 50)")
    finetune_epochs: int | None = field_help(None, "finetune epochs (default --epochs, else the job's 10)")
    scratch_epochs: int | None = field_help(None, "train_scratch epochs (default --epochs, else the job's 100)")
    top_learning_rate: float | None = field_help(None, "train_top learning rate (default rmsprop 1e-3)")
    finetune_learning_rate: float | None = field_help(None, "finetune learning rate (default SGD 1e-4)")
    scratch_learning_rate: float | None = field_help(None, "train_scratch learning rate (default rmsprop 1e-3)")
    batch_size: int = field_help(32, "global batch size for extraction, the top MLP and fine-tuning")
    scratch_batch_size: int = field_help(SCRATCH_BATCH_SIZE, "train_scratch's global batch size")
    dropout: float = field_help(0.5, "dropout rate before the output layer of every trained model")
    ema_momentum: float = field_help(0.995, EMA_HELP)
    seed: int = field_help(0, "seed for initialisation, shuffling and augmentation")
    max_failures: int = field_help(2, "worker-group restarts (from the last checkpoint) per training job")
    skip: str = field_help("", "comma-separated stages to skip: finetune, scratch")
    finetune_shift: float = field_help(FINETUNE_SHIFT, "finetune --shift")
    scratch_shift: float = field_help(SCRATCH_SHIFT, "train_scratch --shift")
    rotation: float = field_help(SCRATCH_ROTATION, ROTATION_HELP)
    cache_block4: bool = field_help(True, "extract VGG16's block-4 outputs too and fine-tune on them (see "
                                          "jobs.finetune --cache-block4); --no-cache-block4 streams the images")
    overwrite: bool = field_help(False, "redo every stage even if finished results exist")
    mlflow_uri: str | None = field_help(None, MLFLOW_URI_HELP)
    mlflow_experiment: str = field_help(DEFAULT_EXPERIMENT, "MLflow experiment the training jobs are logged to")
    audit: bool = field_help(False, "run jobs.audit_data (its defaults) on the features between extraction and "
                                    "training: <output-dir>/audit/report.html beside report.md; it excludes nothing "
                                    "(pass its suspects.txt, once checked, as --exclude)")

    def __post_init__(self) -> None:
        self.check_data_options()
        for name in ("image_size", "scratch_image_size"):
            value = getattr(self, name)
            if value is None or value < 32:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer of at least 32; got {value!r}")
        check_weights(self.weights)
        check_choice("preprocessing", self.preprocessing, PREPROCESSINGS)
        check_choice("precision", self.precision, PRECISIONS)
        for name in ("workers", "gpu_wait_s", "block_files", "num_workers", "batch_size", "scratch_batch_size"):
            check_positive(name, getattr(self, name))
        check_positive("gpus", self.gpus, allow_none=True)
        for name in ("epochs", *(f"{stage}_{option}" for stage in RUN_ALL_STAGES for option in PER_STAGE_OPTIONS)):
            check_positive(name, getattr(self, name), allow_none=True)
        check_workers_divide_batch(self.num_workers, self.batch_size)
        check_workers_divide_batch(self.num_workers, self.scratch_batch_size, "--scratch-batch-size")
        check_range("dropout", self.dropout, 0, 1, open_high=True)
        check_range("ema_momentum", self.ema_momentum, 0, 1, open_high=True)
        for stage in IMAGE_STAGES:
            check_range(f"{stage}_shift", getattr(self, f"{stage}_shift"), 0, 1, open_high=True)
        check_range("rotation", self.rotation, 0, 180)
        if self.max_failures is None or self.max_failures < 0:
            raise ConfigError(f"--max-failures must be 0 or more; got {self.max_failures!r}")
        for stage in filter(None, (s.strip() for s in self.skip.split(","))):
            check_choice("skip", stage, SKIPPABLE)
        check_output_location("output_dir", self.output_dir)

    def skipped(self) -> set[str]:
        """The stages named in ``--skip``."""
        return {s.strip() for s in self.skip.split(",") if s.strip()}


OUTPUT_FILE_SUFFIXES = (".parquet", ".csv")


@dataclasses.dataclass
class PredictConfig(InferenceOptions, DecodeOptions, LogOptions):
    """Settings of ``jobs.predict``: a trained classifier over any image folder."""

    model: str = field_help(dataclasses.MISSING, "model.keras written by jobs.train_top, jobs.finetune or "
                                                 "jobs.train_scratch (local path or URI)")
    input: str = field_help(dataclasses.MISSING, "image folder (searched recursively) or a glob such as "
                                                 "'photos/**/*.jpg' (local path or URI)")
    output: str = field_help(dataclasses.MISSING, "file.parquet or file.csv (one file), or a folder for Parquet "
                                                  "shards (local path or URI)")
    overwrite: bool = field_help(False, "replace an existing output")

    def __post_init__(self) -> None:
        self.check_inference_options()
        self.check_decode_options()
        read_metadata(self.model)  # a missing or foreign model file fails here, before any work
        is_file = storage.is_file(self.output)
        if is_file and not self.overwrite:
            raise ConfigError(f"--output {self.output!r} exists; pass --overwrite to replace it")
        if is_file and not self.output.lower().endswith(OUTPUT_FILE_SUFFIXES):
            raise ConfigError(f"--output {self.output!r} is an existing file; give a folder or a .parquet/.csv name")
        problem = storage.describe_output_problem(self.output)
        if problem:
            raise ConfigError(f"--output {self.output!r} cannot be written: {problem}")


@dataclasses.dataclass
class ServeConfig(DecodeOptions, LogOptions):
    """Settings of ``jobs.serve``: a trained classifier behind HTTP, answering as batch prediction would."""

    model: str = field_help(dataclasses.MISSING, "model.keras written by a training job (local path or URI)",
                            kw_only=True)
    host: str = field_help("127.0.0.1", "address the HTTP server listens on (0.0.0.0: every interface)", kw_only=True)
    port: int = field_help(8000, "HTTP port", kw_only=True)
    replicas: int | None = field_help(None, "model replicas (default: one per GPU of the cluster, each on its GPU; "
                                            "1 on a cluster without GPUs)", kw_only=True)
    max_batch_size: int = field_help(32, "requests answered by one model call at most", kw_only=True)
    batch_wait_s: float = field_help(0.01, "how long a replica waits for a batch to fill", kw_only=True)
    max_upload_mb: float = field_help(20.0, "larger request bodies are refused with HTTP 413", kw_only=True)
    max_images_per_request: int = field_help(64, "JSON requests with more images are refused with HTTP 413, "
                                                 "before any is decoded", kw_only=True)
    auth_token_file: str | None = field_help(None, "require 'Authorization: Bearer <token>' with the token in this "
                                                   "file (default: $IMAGE_CLASSIFIER_TOKEN when set, else no token)",
                                             kw_only=True)
    insecure: bool = field_help(False, "allow a --host beyond loopback without a token", kw_only=True)
    precision: str = field_help("auto", "auto: bfloat16 where the hardware has it, else float32", PRECISIONS,
                                kw_only=True)

    def __post_init__(self) -> None:
        check_range("port", self.port, 1, 65535)
        check_positive("replicas", self.replicas, allow_none=True)
        check_positive("max_batch_size", self.max_batch_size)
        check_range("batch_wait_s", self.batch_wait_s, 0, 60)
        check_positive("max_upload_mb", self.max_upload_mb)
        check_positive("max_images_per_request", self.max_images_per_request)
        self.check_decode_options()
        check_choice("precision", self.precision, PRECISIONS)


# Cosine similarity of pooled VGG16 features at or above which two photos are near duplicates:
# above every pair of distinct photos of the shared sample (up to 0.932), below 99.8 % of generated
# copies (bench/audit_calibration.py: re-encoded, resized, cropped, brightened).
NEAR_THRESHOLD = 0.935


@dataclasses.dataclass
class AuditConfig(DataOptions, LogOptions):
    """Settings of ``jobs.audit_data``: duplicates and leakage, likely wrong labels and strays, and a report."""

    features_dir: str | None = field_help(None, "output of jobs.extract_features, every split of it audited; default: "
                                                "extract --data-dir (the built-in data set without it) first, into "
                                                "outputs/<data folder name>/features as jobs.extract_features does")
    output_dir: str | None = field_help(None, "where the report and the scores go (local path or URI); default "
                                              "outputs/<data folder name>/audit")
    folds: int = field_help(5, "cross-validation folds of the out-of-sample probabilities the label check reads")
    near_threshold: float = field_help(NEAR_THRESHOLD, "cosine similarity of pooled VGG16 features at or above which "
                                                       "two photos are near duplicates")
    top_k: int = field_help(24, "suspects of each kind shown in the report and listed in suspects.txt")
    top_model: str | None = field_help(None, "model.keras of jobs.train_top on these features: the leakage's effect "
                                             "on validation accuracy is measured with it (default: with the "
                                             "cross-validation probabilities)")
    overwrite: bool = field_help(False, "redo the audit even if a finished one with the same settings exists")

    def __post_init__(self) -> None:
        if self.features_dir is not None and self.data_dir is not None:
            raise ConfigError("give --features-dir (an extraction to audit) or --data-dir (photos to extract "
                              "first), not both")
        self.check_data_options()
        check_input_location("features_dir", self.features_dir)
        if self.folds is None or self.folds < 2:
            raise ConfigError(f"--folds must be an integer of at least 2; got {self.folds!r}")
        check_range("near_threshold", self.near_threshold, 0, 1, open_low=True)
        check_positive("top_k", self.top_k)
        check_input_location("top_model", self.top_model, "file")
        check_output_location("output_dir", self.output_dir)
