"""Library versions recorded in manifests and model metadata, so results can be traced."""

from __future__ import annotations

import importlib.metadata
import platform

_PACKAGES = ("ray", "tensorflow", "tensorflow-cpu", "keras", "numpy", "pyarrow", "pillow")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape the results."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out
