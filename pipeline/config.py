"""Typed job settings: one dataclass per job, its fields the job's options (``pipeline.options``
turns a command line or a config file into one), ``jobs.run_all``'s composed from its stages'."""

from __future__ import annotations

import dataclasses

from pipeline.errors import ConfigError
from pipeline.images.decode import MAX_IMAGE_MEGAPIXELS, PILLOW_LIMIT_MEGAPIXELS
from pipeline.options import check_at_least, check_choices, check_positive, check_range, field_help

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
HOLD_DATA = ("auto", "always", "never")
PREPROCESSINGS = ("auto", "torch", "caffe")
NAMED_WEIGHTS = ("torchvision", "keras", "none")
LAYOUTS = ("splits", "kaggle")
SKIPPABLE = ("finetune", "scratch")
PRECISION_HELP = ("auto: decided by each process from its device: bfloat16 on GPUs of compute capability >= 8.0 and "
                  "on bf16 CPUs, float16 on older GPUs (inference only), else float32")
OVERWRITE_HELP = "redo the job even if a finished one with the same settings is in its output folder"


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


@dataclasses.dataclass(kw_only=True)
class LogOptions:
    """What a job prints (shared by every job, last among its bases: the options classes' ``__post_init__``
    checks chain through ``super()`` and end here)."""

    verbose: bool = field_help(False, "print everything: TensorFlow's start-up logs and Ray Train's and Ray Data's "
                                      "bookkeeping from every process (default: the project's messages, Ray Data's "
                                      "progress bars and one line per training epoch)")

    def __post_init__(self) -> None:
        check_choices(self)


@dataclasses.dataclass(kw_only=True)
class DecodeOptions:
    """How image files are decoded (shared by every job that decodes images)."""

    max_image_megapixels: float = field_help(MAX_IMAGE_MEGAPIXELS, "images whose header declares more pixels than this "
                                             "are rejects (reason 'too large'), never decoded: it bounds a decode's "
                                             "memory")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("max_image_megapixels", self.max_image_megapixels, 0, PILLOW_LIMIT_MEGAPIXELS, open_low=True)

    @property
    def max_pixels(self) -> int:
        """``--max-image-megapixels`` in pixels, as ``pipeline.images.decode`` takes it."""
        return round(self.max_image_megapixels * 1_000_000)


@dataclasses.dataclass
class DataOptions(DecodeOptions):
    """Where the labelled images are and how they are read (shared by every job that reads a data root)."""

    data_dir: str | None = field_help(None, "data root (default: the built-in synthetic set, which proves the "
                                            "installation only; fine-tuning: the data of its top model)",
                                      location="folder")
    layout: str = field_help("splits", "splits: <root>/<split>/<class>/<image>; kaggle: flat <root>/cat.1.jpg", LAYOUTS)
    validation_fraction: float = field_help(0.2, "fraction of files hashed into validation (kaggle layout)")
    max_images_per_class: int | None = field_help(None, "use at most this many images per class and split (smoke tests)")
    max_reject_fraction: float = field_help(0.05, "fail if more than this fraction of files cannot be decoded")
    exclude: str | None = field_help(None, "a text file of photos to leave out, one path a line relative to the "
                                           "data root (train/cats/cat.1.jpg), as the suspects.txt of "
                                           "jobs.audit_data lists them", location="file")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("validation_fraction", self.validation_fraction, 0, 1, open_low=True, open_high=True)
        check_positive("max_images_per_class", self.max_images_per_class, allow_none=True)
        check_range("max_reject_fraction", self.max_reject_fraction, 0, 1)


DECODE_OPTIONS = tuple(f.name for f in dataclasses.fields(DecodeOptions))
# The options that name a data root and how it is listed (what a job reading stored features drops).
LISTING_OPTIONS = tuple(f.name for f in dataclasses.fields(DataOptions) if f.name not in DECODE_OPTIONS)
DATA_OPTIONS = LISTING_OPTIONS + DECODE_OPTIONS

# 128 files: a few MB of decoded pixels per block (Ray Data's blocks are happiest between 1 and 128 MB), about
# 8,000 blocks at a million files, and at most 128 files of work lost per block in flight when a run is killed.
DEFAULT_BLOCK_FILES = 128


@dataclasses.dataclass(kw_only=True)
class InferenceOptions:
    """How the VGG16 / classifier actor pool of extraction and prediction is sized and run."""

    precision: str = field_help("auto", PRECISION_HELP, PRECISIONS)
    workers: int = field_help(1, "inference actors when the cluster has no GPUs and --gpus is not given")
    gpus: int | None = field_help(None, "run this many one-GPU inference actors, asking the cluster (its autoscaler) "
                                        "for the GPUs even when none is up yet; default: one per GPU present, "
                                        "else --workers CPU actors")
    gpu_wait_s: float = field_help(900.0, "with --gpus: how long to wait for the GPUs to join the cluster")
    batch_size: int = field_help(32, "images per inference batch")
    block_files: int = field_help(DEFAULT_BLOCK_FILES, "files per block: decoded, run and committed together (an "
                                  "interrupted run redoes at most the blocks in flight)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("workers", self.workers)
        check_positive("gpus", self.gpus, allow_none=True)
        check_positive("gpu_wait_s", self.gpu_wait_s)
        check_positive("batch_size", self.batch_size)
        check_positive("block_files", self.block_files)


@dataclasses.dataclass
class ExtractConfig(InferenceOptions, DataOptions, LogOptions):
    """Settings of ``jobs.extract_features``: image folders → VGG16 bottleneck features in Parquet."""

    output_dir: str | None = field_help(None, "where the shards go (local path or URI); default outputs/<data folder "
                                              "name>/features", location="output")
    # VGG16 sees images at its ImageNet size (about a point of top-MLP accuracy over 150 px, docs/performance.md).
    image_size: int = field_help(224, "images are resized to this many pixels square (at least 32)")
    weights: str = field_help("torchvision", "VGG16 weights: torchvision, keras, none, or a path to a Keras weights "
                                             "file", location="weights")
    preprocessing: str = field_help("auto", "pixel normalisation; auto follows the weights", PREPROCESSINGS)
    cache_block4: bool = field_help(False, "also write VGG16's block-4 outputs (training images: also of their mirror "
                                           "image) under <output-dir>/block4/, for jobs.finetune --cache-block4")
    overwrite: bool = field_help(False, OVERWRITE_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least("image_size", self.image_size, 32, " (VGG16 halves it five times)")


@dataclasses.dataclass
class TrainConfig(LogOptions):
    """Settings shared by the three training jobs."""

    output_dir: str | None = field_help(None, "run folder; the job writes <output-dir>/<job>/ (default outputs/<data "
                                              "folder name>)", location="output")
    num_workers: int = field_help(1, "Ray Train workers (data-parallel replicas)")
    use_gpu: bool = field_help(False, "put each Ray Train worker on a GPU")
    epochs: int = field_help(50, "training epochs")
    batch_size: int = field_help(32, "global batch size (split evenly across workers)")
    learning_rate: float | None = field_help(None, "default: rmsprop 1e-3 (top, scratch), SGD 1e-4 (finetune)",
                                             per_stage=True)
    dropout: float = field_help(0.5, "dropout rate before the output layer")
    ema_momentum: float = field_help(0.995, "momentum of the moving average of the weights that every epoch's "
                                     "evaluation, the checkpoints and the exported model use (lowered so that it spans "
                                     "at most the last tenth of the run's steps); 0: the trained weights themselves")
    seed: int = field_help(0, "seed for initialisation, shuffling and augmentation")
    hold_data: str = field_help("auto", "each worker holds all the training data in memory (then any worker count "
                                "takes the same steps) or streams its shard every epoch: auto holds it when the "
                                "workers' measured footprints fit in half the memory Ray may hand out "
                                "(docs/architecture.md#hold-or-stream)", HOLD_DATA)
    precision: str = field_help("auto", PRECISION_HELP, PRECISIONS)
    max_failures: int = field_help(2, "worker-group restarts (from the last checkpoint) before giving up")
    overwrite: bool = field_help(False, OVERWRITE_HELP)
    mlflow_uri: str | None = field_help(None, "log each training job to this MLflow tracking store (needs the mlflow "
                                              "extra); default: MLFLOW_TRACKING_URI, and no tracking when neither is "
                                              "set")
    mlflow_experiment: str = field_help("ray-image-classifier", "MLflow experiment the run is logged to")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("num_workers", self.num_workers)
        check_positive("epochs", self.epochs)
        check_positive("batch_size", self.batch_size)
        check_workers_divide_batch(self.num_workers, self.batch_size)
        check_positive("learning_rate", self.learning_rate, allow_none=True)
        check_range("dropout", self.dropout, 0, 1, open_high=True)
        check_range("ema_momentum", self.ema_momentum, 0, 1, open_high=True)
        check_at_least("max_failures", self.max_failures, 0)


@dataclasses.dataclass
class TrainTopConfig(TrainConfig):
    """Settings of ``jobs.train_top``: the top MLP on VGG16 feature shards."""

    features_dir: str | None = field_help(None, "output of jobs.extract_features; default: extract the built-in data "
                                                "set first", location="folder")


SHIFT_HELP = ("augmentation: random shift within ± this fraction of the image's side, each axis drawn on its own "
              "(cached fine-tuning shifts the block-4 map by the nearest whole number of its 16-pixel cells); "
              "0: none")


@dataclasses.dataclass
class ImageTrainConfig(DataOptions, TrainConfig):
    """Settings shared by the jobs that stream images (fine-tuning, the small CNN)."""

    shift: float = field_help(0.0, SHIFT_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("shift", self.shift, 0, 1, open_high=True)


@dataclasses.dataclass
class FinetuneConfig(ImageTrainConfig):
    """Settings of ``jobs.finetune``: VGG16 block 5 + top, initialised from a train_top result."""

    epochs: int = field_help(10, "training epochs")
    # 0.15 of 224 px is 2 cells of the block-4 map that cached fine-tuning shifts.
    shift: float = field_help(0.15, SHIFT_HELP)
    top_model: str | None = field_help(None, "model.keras written by jobs.train_top (default "
                                             "<output-dir>/top/model.keras)", location="file")
    cache_block4: bool = field_help(True, "train block 5 + top on cached block-4 outputs of the top model's feature "
                                          "folder (added there if missing; augmentation: mirror images and --shift), "
                                          "which runs blocks 1-4 once per image instead of every epoch; "
                                          "--no-cache-block4 streams the images through all of VGG16 every epoch, "
                                          "with the article's shear and zoom as well as flips and --shift, and writes "
                                          "<output-dir>/finetune_streamed/")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cache_block4 and (self.data_dir is not None or self.max_images_per_class is not None
                                  or self.exclude is not None):
            raise ConfigError("--cache-block4 (the default) trains on the images the top model's features were "
                              "extracted from; to fine-tune on --data-dir, --max-images-per-class or --exclude, add "
                              "--no-cache-block4 (or extract that data with jobs.extract_features --cache-block4, "
                              "which takes --exclude too, and train a top model on it)")


@dataclasses.dataclass
class ScratchConfig(ImageTrainConfig):
    """Settings of ``jobs.train_scratch``: the small CNN trained from scratch with augmentation."""

    # Beyond the reference article's (batch 32, 50 epochs, shear, zoom, flips, 150 px), as Chollet's later book goes:
    # twice the steps per epoch and the epochs, rotations and shifts too (docs/performance.md, Accuracy).
    epochs: int = field_help(100, "training epochs")
    batch_size: int = field_help(16, "global batch size (split evenly across workers)")
    image_size: int = field_help(150, "images are resized to this many pixels square (at least 32)")
    rotation: float = field_help(20.0, "the small CNN's augmentation: random rotation within ± this many degrees "
                                       "(on top of the reference article's shear 0.2, zoom 0.2 and horizontal flip); "
                                       "0: none")
    shift: float = field_help(0.1, SHIFT_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least("image_size", self.image_size, 32)
        check_range("rotation", self.rotation, 0, 180)


OUTPUT_FILE_SUFFIXES = (".parquet", ".csv")


@dataclasses.dataclass
class PredictConfig(InferenceOptions, DecodeOptions, LogOptions):
    """Settings of ``jobs.predict``: a trained classifier over any image folder."""

    model: str = field_help(dataclasses.MISSING, "model.keras written by jobs.train_top, jobs.finetune or "
                                                 "jobs.train_scratch (local path or URI)", location="model")
    input: str = field_help(dataclasses.MISSING, "image folder (searched recursively) or a glob such as "
                                                 "'photos/**/*.jpg' (local path or URI)")
    output: str = field_help(dataclasses.MISSING, "file.parquet or file.csv (one file), or a folder for Parquet "
                                                  "shards (local path or URI)")
    overwrite: bool = field_help(False, "replace an existing output")


@dataclasses.dataclass(kw_only=True)
class ServeConfig(DecodeOptions, LogOptions):
    """Settings of ``jobs.serve``: a trained classifier behind HTTP, answering as batch prediction would."""

    model: str = field_help(dataclasses.MISSING, "model.keras written by a training job (local path or URI)",
                            location="model")
    host: str = field_help("127.0.0.1", "address the HTTP server listens on (0.0.0.0: every interface)")
    port: int = field_help(8000, "HTTP port")
    replicas: int | None = field_help(None, "model replicas (default: one per GPU of the cluster, each on its GPU; "
                                            "1 on a cluster without GPUs)")
    max_batch_size: int = field_help(32, "requests answered by one model call at most")
    batch_wait_s: float = field_help(0.01, "how long a replica waits for a batch to fill")
    max_upload_mb: float = field_help(20.0, "larger request bodies are refused with HTTP 413")
    max_images_per_request: int = field_help(64, "JSON requests with more images are refused with HTTP 413, "
                                                 "before any is decoded")
    auth_token_file: str | None = field_help(None, "require 'Authorization: Bearer <token>' with the token in this "
                                                   "file (default: $IMAGE_CLASSIFIER_TOKEN when set, else no token)")
    insecure: bool = field_help(False, "allow a --host beyond loopback without a token")
    precision: str = field_help("auto", PRECISION_HELP, PRECISIONS)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("port", self.port, 1, 65535)
        check_positive("replicas", self.replicas, allow_none=True)
        check_positive("max_batch_size", self.max_batch_size)
        check_range("batch_wait_s", self.batch_wait_s, 0, 60)
        check_positive("max_upload_mb", self.max_upload_mb)
        check_positive("max_images_per_request", self.max_images_per_request)


# Above every pair of distinct photos of the shared sample (up to 0.932), below 99.8 % of generated copies
# (bench/audit_calibration.py: re-encoded, resized, cropped, brightened).
NEAR_THRESHOLD = 0.935


@dataclasses.dataclass
class AuditConfig(DataOptions, LogOptions):
    """Settings of ``jobs.audit_data``: duplicates and leakage, likely wrong labels and strays, and a report."""

    features_dir: str | None = field_help(None, "output of jobs.extract_features, every split of it audited; default: "
                                                "extract --data-dir (the built-in data set without it) first, into "
                                                "outputs/<data folder name>/features as jobs.extract_features does",
                                          location="folder")
    output_dir: str | None = field_help(None, "where the report and the scores go (local path or URI); default "
                                              "outputs/<data folder name>/audit", location="output")
    folds: int = field_help(5, "cross-validation folds of the out-of-sample probabilities the label check reads")
    near_threshold: float = field_help(NEAR_THRESHOLD, "cosine similarity of pooled VGG16 features at or above which "
                                                       "two photos are near duplicates")
    top_k: int = field_help(24, "suspects of each kind shown in the report and listed in suspects.txt")
    top_model: str | None = field_help(None, "model.keras of jobs.train_top on these features: the leakage's effect "
                                             "on validation accuracy is measured with it (default: with the "
                                             "cross-validation probabilities)", location="file")
    overwrite: bool = field_help(False, OVERWRITE_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.features_dir is not None and self.data_dir is not None:
            raise ConfigError("give --features-dir (an extraction to audit) or --data-dir (photos to extract "
                              "first), not both")
        check_at_least("folds", self.folds, 2)
        check_range("near_threshold", self.near_threshold, 0, 1, open_low=True)
        check_positive("top_k", self.top_k)
