"""The web app's errors for people: a message to show, and the HTTP status it becomes.

Every part of the app (the stores, the service, the HTTP request checks)
raises these, and each surface maps them in one place: the HTTP API in
``app/http_api.py`` (status and the protocol's error shape), the Gradio UI and
script API in ``app/ui/errors.py`` (a ``gr.Error`` with the message). Wrong
input of any origin is a :class:`BadRequest`.
"""

from __future__ import annotations

import re

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class AppError(Exception):
    """Something the user should read about; ``http_status`` says how the HTTP API answers it."""

    http_status: int = 500

    def __init__(self, message: str = "", *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


class BadRequest(AppError, ValueError):
    """The caller's input is wrong (empty, too long, malformed); the same input will fail again."""

    http_status = 400


def refuse_lone_surrogates(what: str, text: str) -> None:
    """A :class:`BadRequest` for text holding a lone surrogate (``"\\ud800"``): JSON and Python can spell it,
    but no UTF-8 channel (MQTT, SQLite, a runtime) can carry it, so it would fail later as an internal error."""
    found = None if text.isascii() else _LONE_SURROGATE.search(text)
    if found is not None:
        raise BadRequest(f"{what} holds a lone surrogate ({found.group()!a}), which is not valid Unicode text")
