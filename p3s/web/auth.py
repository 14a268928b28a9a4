"""Who may look and who may act: operators' passwords and tokens, signed-cookie sessions, CSRF tokens.

Operators log in with a password (``web.password_file``) or a token
(``web.token_file``, also accepted as ``Authorization: Bearer <token>``).  The
session is Starlette's signed cookie (itsdangerous); it holds the operator's
name and the session's CSRF token, which every form carries and every POST
must send back.  A request authenticated by a bearer token carries no cookie a
browser would add by itself, so it needs no CSRF token.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from starlette.requests import Request

from p3s.config import Settings
from p3s.errors import ConfigError

log = logging.getLogger("p3s.web")

DEFAULT_OPERATOR = "operator"
# Names and secrets are checked against what a login form may reasonably carry.
MAX_FIELD = 256


def _read_pairs(path: str, what: str) -> dict[str, str]:
    """Lines ``name:secret`` (``#`` comments and blank lines skipped); a bare line is ``operator``'s."""
    if not path:
        return {}
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"web.{what}: cannot read {path}: {exc.strerror}") from exc
    out: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, secret = line.partition(":")
        if not sep:
            name, secret = DEFAULT_OPERATOR, line
        name, secret = name.strip(), secret.strip()
        if not name or not secret:
            raise ConfigError(f"web.{what}: {path} line {number}: expected name:secret")
        out[name] = secret
    return out


def secret_key(settings: Settings) -> str:
    """The key that signs session cookies: ``web.secret_file``, or ``<state_dir>/web-secret`` made 0600."""
    path = Path(settings.web.secret_file) if settings.web.secret_file else settings.state_path / "web-secret"
    if not settings.web.secret_file and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it first: use theirs
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32) + "\n")
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"web.secret_file: cannot read {path}: {exc.strerror}") from exc
    if len(key) < 16:
        raise ConfigError(f"web.secret_file: {path} holds fewer than 16 characters: too weak to sign sessions")
    return key


@dataclass(frozen=True)
class Operators:
    """The operators' passwords and tokens, read once when the service starts."""

    passwords: dict[str, str] = field(default_factory=dict, repr=False)
    tokens: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Operators:
        return cls(_read_pairs(settings.web.password_file, "password_file"),
                   _read_pairs(settings.web.token_file, "token_file"))

    @property
    def any(self) -> bool:
        return bool(self.passwords or self.tokens)

    def by_token(self, token: str) -> str | None:
        """The operator whose token this is, or None (every token compared, in constant time each)."""
        found = None
        for name, known in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = name
        return found

    def login(self, username: str, password: str) -> str | None:
        """The operator these credentials name: a password of ``username``, or any operator's token."""
        if not password or len(username) > MAX_FIELD or len(password) > MAX_FIELD:
            return None
        known = self.passwords.get(username)
        if known is not None and hmac.compare_digest(known.encode(), password.encode()):
            return username
        return self.by_token(password)


def bearer(request: Request, operators: Operators) -> str | None:
    """The operator named by an ``Authorization: Bearer`` header, or None."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return operators.by_token(token.strip())


def operator_of(request: Request, operators: Operators) -> str | None:
    """The logged-in operator: a bearer token's, else the session's."""
    name = bearer(request, operators)
    if name is not None:
        return name
    name = request.session.get("operator")
    return name if isinstance(name, str) and (name in operators.passwords or name in operators.tokens) else None


def csrf_token(request: Request) -> str:
    """This session's CSRF token, made on first use."""
    token = request.session.get("csrf")
    if not isinstance(token, str) or len(token) < 32:
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


def csrf_ok(request: Request, sent: object, operators: Operators) -> bool:
    """True if ``sent`` is this session's CSRF token, or the request carries a bearer token instead."""
    if bearer(request, operators) is not None:
        return True
    known = request.session.get("csrf")
    if not isinstance(sent, str) or not isinstance(known, str) or not known:
        return False
    return hmac.compare_digest(known.encode(), sent.encode())
