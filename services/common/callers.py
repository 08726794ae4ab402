"""Who is calling: the name recorded as the actor of what a call changes.

Until authentication is configured, callers name themselves in the ``x-steward-caller``
metadata entry (trusted, as everything is in the embedded mode); the authentication interceptor
replaces this with the authenticated identity.
"""

from __future__ import annotations

import re
from typing import Final

import grpc

CALLER_METADATA_KEY: Final = "x-steward-caller"
ANONYMOUS: Final = "anonymous"
_NAME: Final = re.compile(r"[A-Za-z0-9_.:@/-]{1,128}")


def caller_of(context: grpc.ServicerContext) -> str:
    """The caller's name, or ``anonymous``; never anything but a short plain name."""
    for key, value in context.invocation_metadata() or ():
        if key == CALLER_METADATA_KEY and isinstance(value, str) and _NAME.fullmatch(value):
            return value
    return ANONYMOUS
