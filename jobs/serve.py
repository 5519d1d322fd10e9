"""Serve a trained classifier over HTTP: ``POST /predict`` with an image's bytes, or JSON
``{"images": [<base64>, ...]}``, answers with the fields batch prediction writes
(``python -m jobs.serve --help``). Beyond loopback it needs a token (``--auth-token-file`` or
``$IMAGE_CLASSIFIER_TOKEN``, sent as ``Authorization: Bearer <token>``) or ``--insecure``."""

from jobs._cli import entry
from pipeline.config import ServeConfig
from pipeline.serving.server import serve_until_interrupted

main = entry(ServeConfig, __doc__, serve_until_interrupted)

if __name__ == "__main__":
    raise SystemExit(main())
