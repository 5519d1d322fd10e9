"""What every job's ``main`` shares: parse the config, attach to or start Ray, turn user errors into one line."""

from __future__ import annotations

import faulthandler
import signal
import sys
from typing import Callable, Sequence, TypeVar

from pipeline.batch.cluster import init_ray
from pipeline.options import parse_config
from pipeline.errors import UserError
from pipeline.redact import redact

C = TypeVar("C")


def entry(config_cls: type[C], description: str, body: Callable[[C], object]) -> Callable[..., int]:
    """A job module's ``main(argv=None) -> int`` with the job's config, ``--help`` text and body."""

    def main(argv: Sequence[str] | None = None) -> int:
        """Parse ``argv`` (default: the command line; invalid options exit 2 before any work), then run the job;
        0 on success, 2 on a user error."""
        cfg = parse_config(config_cls, argv, description)
        # ``kill -USR1 <pid>`` prints every thread's stack to stderr: how a job that seems stuck is diagnosed. The
        # process's own stderr, not sys.stderr: a caller that captures output (pytest) replaces that with no file.
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
        # Deferred: the prechecks import every job's modules (training, serving, audit); --help and bad options exit.
        from pipeline.prechecks import preflight

        try:
            preflight(cfg)  # what the options name is checked before the cluster starts
            init_ray(verbose=cfg.verbose)
            body(cfg)
            return 0
        except UserError as exc:
            # Messages name locations and URIs, which may carry credentials.
            print(f"error: {redact(str(exc))}", file=sys.stderr)
            return 2

    return main
