"""Typed errors of the chat and document stores.

Callers (the Gradio UI, the HTTP API) map them to user-facing messages and
status codes without parsing text: each class carries the HTTP status it
should become (see app/errors.py). Bad input is a :class:`~app.errors.BadRequest`
like bad input anywhere in the app; it is also a :class:`StoreError`, so the
store's own ``except StoreError`` clauses let it pass unchanged.
"""

from __future__ import annotations

from app.errors import AppError, BadRequest


class StoreError(AppError):
    """Base class: something in the chat or document store went wrong."""

    http_status = 500


class NotFoundError(StoreError):
    """A session, message or document id that the store does not know."""

    http_status = 404


class BadInputError(StoreError, BadRequest):
    """The caller's input is invalid (empty, corrupt, malformed); retrying the same input will fail again."""

    http_status = 400


class TooLargeError(BadInputError):
    """An upload or a message exceeds a configured size limit."""

    http_status = 413


class UnsupportedFormatError(BadInputError):
    """A file whose type the document store cannot read."""

    http_status = 415


class EncryptedDocumentError(BadInputError):
    """A password-protected PDF (or an encrypted Office file) that cannot be read without its password."""

    http_status = 422
