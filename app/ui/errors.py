"""The one mapping of the app's errors for Gradio: an :class:`~app.errors.AppError` becomes a ``gr.Error``.

``gradio_client`` shows a ``gr.Error``'s message to the script (any other
exception only as "an error occurred"), so every script endpoint runs its
body inside :func:`gradio_errors`.
"""

from __future__ import annotations

import contextlib
import html
from collections.abc import Iterator

import gradio as gr

from app.errors import AppError


@contextlib.contextmanager
def gradio_errors() -> Iterator[None]:
    """Turn an AppError raised inside the block into a gr.Error with the same message."""
    try:
        yield
    except AppError as error:
        raise gr.Error(str(error)) from None


def warn(message: object) -> None:
    """A warning toast; escaped, because Gradio shows toasts as HTML and a message may quote what an agent said."""
    gr.Warning(html.escape(str(message)))
