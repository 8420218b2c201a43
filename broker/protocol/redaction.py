"""Credentials out of URLs before they are shown, logged or published (issue 13.10).

A backend URL may carry a login (``http://user:pass@host``) or a key in its
query. The agent keeps the real URL for its HTTP client and shows only the
redacted one (``http://user:***@host``); the status message redacts again on
both ends, so an older agent cannot put a password on the open ``/status``
page either. Standard library only: the agent and the app both use it.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

MASK = "***"

_SECRET_QUERY_KEY = re.compile(r"key|token|secret|passw|auth|sig|credential", re.IGNORECASE)
_URL_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """``url`` with its password (and secret-looking query values) replaced by ``***``.

    ``http://user:pass@host:1/x`` -> ``http://user:***@host:1/x``; a user name alone (often a token) becomes
    ``***``. Text that is not a URL comes back unchanged.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hostport}" if has_password else f"{MASK}@{hostport}"
    query = parts.query
    if query and _SECRET_QUERY_KEY.search(query):
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(key, MASK if _SECRET_QUERY_KEY.search(key) else value) for key, value in pairs],
                          safe="*")
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_urls_in(text: str) -> str:
    """Every URL inside free text (an error message) redacted with :func:`redact_url`."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """``(url without its login, (user, password))``, or ``(url, None)`` when it has none.

    HTTP clients get the login as an explicit basic-auth pair, so no request URL (and hence no error
    message that quotes one) ever carries the password.
    """
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    return urlunsplit((parts.scheme, hostport, parts.path, parts.query, parts.fragment)), (
        unquote(user), unquote(password))
