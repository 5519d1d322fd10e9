"""Choosing and applying numeric precision (float32 or Keras' mixed_bfloat16)."""

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


def resolve_precision(precision: str, using_gpus: bool) -> str:
    """``auto`` becomes bfloat16 where the hardware has it (GPUs, bf16 CPUs), else float32."""
    if precision != "auto":
        return precision
    return "bfloat16" if using_gpus or cpu_has_bf16() else "float32"


@contextlib.contextmanager
def dtype_policy(precision: str) -> Iterator[None]:
    """Build Keras layers under ``mixed_bfloat16`` (variables stay float32) or ``float32``."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
