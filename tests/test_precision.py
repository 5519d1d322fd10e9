"""``--precision auto`` on a CPU: bfloat16 where the CPU computes it natively, else float32."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Native bfloat16 on x86: AVX512-BF16 (AMD Zen 4, Intel Cooper Lake) or AMX's bf16 tiles (Intel Sapphire Rapids).
BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def cpu_flags() -> set[str]:
    """The CPU's feature flags, word by word from /proc/cpuinfo's ``flags`` lines."""
    flags: set[str] = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name.strip() == "flags":
                flags.update(value.split())
    return flags


def test_auto_chooses_bfloat16_on_a_bf16_cpu_and_float32_elsewhere():
    """In a process that sees no GPU (as on a CPU node), for inference and for training."""
    expected = "bfloat16" if cpu_flags() & BF16_FLAGS else "float32"
    script = ("from pipeline.nets.precision import device_precision\n"
              "print(device_precision('auto'), device_precision('auto', allow_float16=False))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "-1", "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [expected, expected], (sorted(cpu_flags() & BF16_FLAGS), proc.stdout)
