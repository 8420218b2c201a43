"""A script that sends the API key to the UI's API is the API user (``--api-user``), without a UI password.

Only with a UI login (without one everybody is the shared user and the UI's API needs no key at all). Gradio
knows a user by its login cookie; this middleware gives a request that carries the right key
(``Authorization: Bearer <key>`` or ``X-API-Key``) the cookie of a login of the API user, minted once per
process and never sent to any client. A wrong key is refused with a 401 (and counted towards the same per-address
back-off as /v1 and /api), so the UI's API gives a key guesser nothing the HTTP API does not.

``gradio_client.Client(url, headers={"Authorization": "Bearer <key>"})`` is all a script needs.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from http.cookies import SimpleCookie
from typing import Any

from app.api_common import ApiContext, ApiError, supplied_key
from app.middleware import API_PREFIXES, ASGIApp, Receive, Scope, Send, client_address, send_json

logger = logging.getLogger(__name__)

GRADIO_COOKIE_PREFIX = "access-token"
"""Gradio's login cookies are ``access-token-<cookie_id>`` and ``access-token-unsecure-<cookie_id>``."""


class ApiKeyUserMiddleware:
    """Requests outside /v1 and /api that carry the API key become the API user's (see the module docstring)."""

    def __init__(self, app: ASGIApp, context: ApiContext, api_user: str, gradio_app: Callable[[], Any]) -> None:
        self.app = app
        self.context = context
        self.api_user = api_user
        self._gradio_app = gradio_app
        self._token = secrets.token_urlsafe(32)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or str(scope.get("path", "")).startswith(API_PREFIXES):
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers", [])}
        supplied = supplied_key(headers)
        if not supplied:
            await self.app(scope, receive, send)
            return
        try:
            self.context.check_key(supplied, client_address(scope))
        except ApiError as error:
            if scope["type"] != "http":
                return  # a websocket with a wrong key: closed unanswered
            extra = [(name.lower().encode(), value.encode()) for name, value in error.headers.items()]
            await send_json(send, error.http_status, {"detail": error.message}, extra)
            return
        gradio = self._gradio_app()
        gradio.tokens[self._token] = self.api_user  # Gradio's configure_app may have replaced the dict
        cookie = _with_login_cookie(headers.get("cookie", ""), f"{GRADIO_COOKIE_PREFIX}-{gradio.cookie_id}",
                                    self._token)
        scope = dict(scope)
        scope["headers"] = [(name, value) for name, value in scope.get("headers", []) if name.lower() != b"cookie"]
        scope["headers"].append((b"cookie", cookie.encode("latin-1")))
        await self.app(scope, receive, send)


def _with_login_cookie(header: str, name: str, token: str) -> str:
    """The request's cookies without any Gradio login cookie, plus the API user's."""
    jar = SimpleCookie()
    try:
        jar.load(header)
    except Exception:  # noqa: BLE001 - a malformed cookie header: keep none of it
        jar = SimpleCookie()
    kept = [f"{key}={morsel.value}" for key, morsel in jar.items() if not key.startswith(GRADIO_COOKIE_PREFIX)]
    return "; ".join([*kept, f"{name}={token}"])
