"""Who may log in to the web UI, and who a script with the API key is.

Users come from three places, all optional (docs/security.md, "Users"):

* ``--ui-username`` / ``--ui-password``: one user, as before;
* ``--ui-user name:password``, repeatable (``SLB_UI_USERS`` as a JSON list): quick, but the password is on the
  command line where ``ps`` shows it;
* ``--ui-users-file``: one user per line, ``name:scrypt$<n>$<r>$<p>$<salt>$<hash>`` (make a line with
  ``python -m app.users NAME``). Only salted hashes: a plain password in that file is refused with a message that
  says how to make the line, so a copied file never gives passwords away.

With any of them set the UI asks for a login and every user has their own chats. A script that sends the API key
(``Authorization: Bearer <key>``) to the UI's API is the API user (``--api-user``, default ``api``) instead.
Passwords are checked with scrypt (memory-hard, stdlib) in a worker thread, so a login never blocks the loop;
an unknown name costs the same as a wrong password, so timing does not tell which names exist.

Run as ``python -m app.users NAME`` to print a users-file line for NAME (the password is asked twice, not echoed).
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import logging
import re
import secrets
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import anyio

logger = logging.getLogger(__name__)

USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
"""A user name: letters, digits and ``._@+-``, at most 64 characters (no ``:``, no space, no brackets)."""
SCHEME = "scrypt"
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
MAX_PASSWORD_CHARS = 1024
MAX_SCRYPT_N = 2**20
"""The largest work factor a users file may ask for (1 GiB of memory per check would be a denial of service)."""


class UsersError(ValueError):
    """A user entry or users file that cannot be used; the message says where and why."""


def check_user_name(name: str) -> str:
    if not isinstance(name, str) or not USER_NAME.match(name):
        raise UsersError(f"user name {name!r} is not allowed: use 1-64 letters, digits or ._@+- (starting with a "
                         "letter or digit)")
    return name


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=2 * 128 * r * n + (1 << 20),
                          dklen=HASH_BYTES)


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$n$r$p$salt$hash`` (base64), the only password form a users file accepts."""
    if not password:
        raise UsersError("the password is empty")
    if len(password) > MAX_PASSWORD_CHARS:
        raise UsersError(f"the password is longer than {MAX_PASSWORD_CHARS} characters")
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"{SCHEME}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def _parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        raise UsersError("not a salted hash: make the line with 'python -m app.users NAME'")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except ValueError:
        raise UsersError("the hash is damaged: make the line again with 'python -m app.users NAME'") from None
    if n < 2 or n & (n - 1) or n > MAX_SCRYPT_N or not 1 <= r <= 32 or not 1 <= p <= 16 or not salt or not digest:
        raise UsersError(f"the scrypt parameters n={n} r={r} p={p} are out of range")
    return n, r, p, salt, digest


def verify_password(password: str, stored: str) -> bool:
    n, r, p, salt, digest = _parse_hash(stored)
    if not isinstance(password, str) or not password or len(password) > MAX_PASSWORD_CHARS:
        _scrypt("-", salt, n, r, p)  # the same cost as a real check
        return False
    return hmac.compare_digest(_scrypt(password, salt, n, r, p), digest)


def parse_users_file(text: str, source: str = "users file") -> dict[str, str]:
    """``{name: hash}`` from a users file; blank lines and ``#`` comments are skipped. Errors name the line."""
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, separator, stored = line.partition(":")
        where = f"{source}, line {number}"
        if not separator or not stored:
            raise UsersError(f"{where}: expected 'name:scrypt$...' (make it with 'python -m app.users NAME')")
        try:
            check_user_name(name.strip())
            _parse_hash(stored.strip())
        except UsersError as error:
            raise UsersError(f"{where}: {error}") from None
        if name.strip() in users:
            raise UsersError(f"{where}: user {name.strip()!r} appears twice")
        users[name.strip()] = stored.strip()
    return users


def read_users_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise UsersError(f"cannot read the users file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise UsersError(f"the users file {path} is not UTF-8 text") from None
    return parse_users_file(text, str(path))


def split_user_entry(entry: str) -> tuple[str, str]:
    """``name:password`` (a ``--ui-user`` flag) as its two parts; the password may itself hold ``:``."""
    name, separator, password = entry.partition(":")
    if not separator or not password:
        raise UsersError("a --ui-user entry must be 'name:password'")
    check_user_name(name.strip())
    if len(password) > MAX_PASSWORD_CHARS:
        raise UsersError(f"the password of {name.strip()!r} is longer than {MAX_PASSWORD_CHARS} characters")
    return name.strip(), password


class UserDirectory:
    """The users who may log in, with hashed passwords only (plain ones from flags are hashed at start)."""

    def __init__(self, hashes: dict[str, str]) -> None:
        self._hashes = dict(hashes)
        self._decoy = hash_password(secrets.token_urlsafe(16))

    @classmethod
    def build(cls, plain: Iterable[tuple[str, str]], hashed: dict[str, str] | None = None) -> UserDirectory:
        """Users from ``(name, password)`` pairs and ``{name: hash}``; a name given twice is an error."""
        hashes = dict(hashed or {})
        for name, password in plain:
            if name in hashes:
                raise UsersError(f"user {name!r} is defined twice")
            hashes[name] = hash_password(password)
        return cls(hashes)

    @property
    def names(self) -> list[str]:
        return sorted(self._hashes)

    def __len__(self) -> int:
        return len(self._hashes)

    def check(self, username: str, password: str) -> bool:
        """Whether the name and password match; an unknown name takes as long as a wrong password."""
        stored = self._hashes.get(username.strip() if isinstance(username, str) else "")
        if stored is None:
            verify_password(password if isinstance(password, str) else "", self._decoy)
            return False
        return verify_password(password, stored)

    async def authenticate(self, username: str, password: str) -> bool:
        """Gradio's ``auth`` callable: the scrypt check runs in a worker thread, never on the event loop."""
        ok = await anyio.to_thread.run_sync(self.check, username, password)
        if not ok:
            logger.info("failed UI login for %r", username[:64] if isinstance(username, str) else username)
        return ok


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m app.users NAME``: print the users-file line for NAME (password asked twice, not shown)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0] in {"-h", "--help"}:
        sys.stderr.write("usage: python -m app.users NAME  (prints 'NAME:scrypt$...' for --ui-users-file)\n")
        return 2
    try:
        name = check_user_name(args[0])
        password = getpass.getpass(f"password for {name}: ")
        if password != getpass.getpass("again: "):
            sys.stderr.write("the two passwords differ\n")
            return 1
        sys.stdout.write(f"{name}:{hash_password(password)}\n")
    except UsersError as error:
        sys.stderr.write(f"{error}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
