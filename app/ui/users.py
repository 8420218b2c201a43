"""Who is asking: the logged-in user of a Gradio request (per-user chats, private documents).

One line for every handler: ``user_of(request)``. With a UI login Gradio puts the user's name on the request
(a script that sends the API key instead is the API user, see app/users.py); without a login everyone is
:data:`~app.store.sessions.SHARED_USER`, so everything is one shared space, as before users existed.
"""

from __future__ import annotations

from typing import Any

from app.store.sessions import SHARED_USER

__all__ = ["SHARED_USER", "user_of"]


def user_of(request: Any) -> str:
    """The user behind a Gradio request (``gr.Request``), or the shared user when there is no login."""
    username = getattr(request, "username", None) if request is not None else None
    return username if isinstance(username, str) and username else SHARED_USER
