"""The serving job's optional bearer token, and the refusal to listen beyond loopback without one.

The token comes from ``--auth-token-file`` or ``$IMAGE_CLASSIFIER_TOKEN``. Replicas get only its
SHA-256 digest, so the token is never among the application's arguments (kept in Ray's state) nor logged.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os

from pipeline.errors import ConfigError

TOKEN_ENV = "IMAGE_CLASSIFIER_TOKEN"


def read_token(token_file: str | None) -> str | None:
    """The token of ``--auth-token-file`` (stripped), else of ``$IMAGE_CLASSIFIER_TOKEN``, else None."""
    if token_file is None:
        return os.environ.get(TOKEN_ENV, "").strip() or None
    try:
        with open(token_file, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--auth-token-file {token_file!r} cannot be read: {exc}") from None
    if not token:
        raise ConfigError(f"--auth-token-file {token_file!r} is empty")
    return token


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1) or ``localhost``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def check_exposure(host: str, token: str | None, insecure: bool) -> None:
    """Refuse to listen beyond loopback without a token unless ``--insecure`` says so."""
    if token is None and not insecure and not is_loopback(host):
        raise ConfigError(f"--host {host} accepts requests from other machines: give a token with --auth-token-file "
                          f"PATH or ${TOKEN_ENV}, or pass --insecure to serve without one")


def token_digest(token: str | None) -> bytes | None:
    """What a replica keeps of the token: its SHA-256 digest (None: no token required)."""
    return hashlib.sha256(token.encode()).digest() if token is not None else None


def authorized(authorization: str, digest: bytes | None) -> bool:
    """Whether an ``Authorization`` header carries the token whose digest is ``digest``, compared in constant time."""
    if digest is None:
        return True
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(hashlib.sha256(presented.strip().encode()).digest(), digest)
