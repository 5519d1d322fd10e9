"""Choosing and applying numeric precision (float32, Keras' mixed_bfloat16 or mixed_float16).

``auto`` is decided where the model runs (inside each inference actor or training worker),
from the device that process got: the driver of a cluster job often runs on a CPU head node
that tells nothing about the GPUs the work lands on.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16() -> bool:
    """Whether this machine's CPU has native bfloat16 instructions (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in _BF16_CPU_FLAGS)


# Compute capability from which a GPU runs bfloat16 natively (Ampere), and float16 on tensor cores (Volta).
BF16_GPU_CAPABILITY = (8, 0)
FP16_GPU_CAPABILITY = (7, 0)


def precision_for(requested: str, gpu_capability: tuple[int, int] | None, allow_float16: bool = True) -> str:
    """``auto`` for a device: bfloat16 on GPUs of compute capability >= 8.0 and on bf16 CPUs,
    float16 on older tensor-core GPUs (inference only: training would need loss scaling), else float32."""
    if requested != "auto":
        return requested
    if gpu_capability is None:
        return "bfloat16" if cpu_has_bf16() else "float32"
    if gpu_capability >= BF16_GPU_CAPABILITY:
        return "bfloat16"
    return "float16" if allow_float16 and gpu_capability >= FP16_GPU_CAPABILITY else "float32"


def device_precision(requested: str, allow_float16: bool = True) -> str:
    """``precision_for`` this process's device: its first visible GPU, else its CPU."""
    if requested != "auto":
        return requested
    import tensorflow as tf  # deferred: seconds to load, and a job's command line and driver need not

    gpus = tf.config.list_physical_devices("GPU")
    capability = None
    if gpus:
        capability = tuple(tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0)))
    return precision_for(requested, capability, allow_float16)


@contextlib.contextmanager
def dtype_policy(precision: str) -> Iterator[None]:
    """Build Keras layers under ``mixed_bfloat16``/``mixed_float16`` (variables stay float32) or ``float32``."""
    import keras  # deferred: Keras loads TensorFlow, which a job's command line and driver need not

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(keras_policy(precision))
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def keras_policy(precision: str) -> str:
    """The Keras dtype policy name of a resolved precision."""
    return {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}.get(precision, "float32")
