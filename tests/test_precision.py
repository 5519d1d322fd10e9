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


# Both branches of ``auto`` on a CPU, whatever this host's CPU has: the flag detection
# (``cpu_has_bf16``, the one function that reads /proc/cpuinfo) is replaced by a fixed answer,
# and everything after it (TensorFlow's device list, the choice) runs for real.
BOTH_BRANCHES = """
from pipeline.nets import precision
for has_bf16 in (True, False):
    precision.cpu_has_bf16 = lambda has_bf16=has_bf16: has_bf16
    print(has_bf16, precision.device_precision('auto'), precision.device_precision('auto', allow_float16=False))
"""


def test_auto_on_a_cpu_follows_the_bf16_flags_for_inference_and_training():
    """A CPU with bf16 instructions gets bfloat16, one without gets float32, for inference and for
    training (``allow_float16=False``), in a process that sees no GPU (as on a CPU node)."""
    proc = subprocess.run([sys.executable, "-c", BOTH_BRANCHES], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": "-1", "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["True bfloat16 bfloat16", "False float32 float32"], proc.stdout
