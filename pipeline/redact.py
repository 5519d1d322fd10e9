"""Credentials hidden in what the project shows or stores (log lines, error messages, JSON records, MLflow
parameters); only copies are redacted, the real location is still the one used to connect. In any URI in any text:

* userinfo: ``scheme://user:password@host`` becomes ``scheme://user:***@host``, a bare token as user
  (``https://TOKEN@host``) ``https://***@host``;
* query values of parameters named like secrets (``token``, ``signature``, ``key``, ``X-Amz-Credential``…):
  ``?token=abc`` becomes ``?token=***``.

Passwords are not always percent-escaped, so the userinfo runs to the *last* ``@`` before whitespace or a double
quote: an ``@``, ``:`` or ``/`` in a password never lets part of it through (at worst a little more is hidden).
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# scheme://, then the userinfo: the longest run of non-space characters up to an '@'.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<info>[^\s\"<>]*)@")
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&;][\w.\-]*(?:token|signature|sig|password|passwd|pwd|secret|key|credential|auth)[\w.\-]*=)"
    r"(?P<value>[^&;#\s\"'<>]*)", re.IGNORECASE)


def _userinfo(match: re.Match) -> str:
    info = match["info"]
    if ":" in info:
        return f"{match['scheme']}{info.split(':', 1)[0]}:{MASK}@"
    # Without a ':' it is a token used as the user name, unless it spans a path ('/'): then the
    # '@' belongs to the path (s3://bucket/photos@2x) and nothing secret precedes it.
    return match[0] if "/" in info else f"{match['scheme']}{MASK}@"


def redact(text: str) -> str:
    """``text`` with the password (or token) of every URI's userinfo and the values of
    secret-looking query parameters replaced by ``***``."""
    if "@" in text:
        text = _USERINFO.sub(_userinfo, text)
    if "=" in text:
        text = _SECRET_PARAM.sub(lambda m: m["name"] + MASK, text)
    return text


def redact_values(value: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, strings…) with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_values(item) for item in value]
    return value
