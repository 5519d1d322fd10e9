"""Serve a trained classifier over HTTP: ``POST /predict`` with an image's bytes, or JSON
``{"images": [<base64>, ...]}``, answers with the fields batch prediction writes
(``python -m jobs.serve --help``). Beyond loopback it needs a token (``--auth-token-file`` or
``$IMAGE_CLASSIFIER_TOKEN``, sent as ``Authorization: Bearer <token>``) or ``--insecure``."""

from __future__ import annotations

import sys
from typing import Sequence

from jobs._cli import run_job
from pipeline.config import ServeConfig
from pipeline.serving.server import serve_until_interrupted


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job."""
    return run_job(ServeConfig, __doc__, serve_until_interrupted, argv)


if __name__ == "__main__":
    sys.exit(main())
