"""Bearer-token authentication of the admin API: HS256 JWTs signed with ``HEIMDEX_JWT_SECRET``.

Claims: ``sub`` (who), ``role`` (``admin`` for every admin route), ``exp`` (required), and an
optional ``owner_id`` that confines an admin to one owner's videos. Error details never echo the
token or the secret.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import jwt
from fastapi import HTTPException, status

JWT_SECRET_ENV = "HEIMDEX_JWT_SECRET"
ADMIN_ROLE = "admin"
# RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.
MIN_SECRET_BYTES = 32
_ALGORITHMS = ["HS256"]


class AuthConfigError(RuntimeError):
    """The API cannot verify tokens: no secret, or one too short to be safe; the message is one line."""


@dataclass(frozen=True)
class Principal:
    """The verified caller: subject, role and, for an owner-scoped token, the only owner it may touch."""

    subject: str
    role: str
    owner_id: uuid.UUID | None = None


def jwt_secret_from_env(secret: str | None = None) -> str:
    """``secret`` or ``HEIMDEX_JWT_SECRET``; AuthConfigError when it is missing or shorter than 32 bytes."""
    secret = secret if secret is not None else os.environ.get(JWT_SECRET_ENV, "").strip()
    if not secret:
        raise AuthConfigError(f"{JWT_SECRET_ENV} is not set: the admin API needs it to verify bearer tokens")
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise AuthConfigError(f"{JWT_SECRET_ENV} is shorter than {MIN_SECRET_BYTES} bytes: too weak for HS256")
    return secret


def unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def verify_token(token: str, secret: str) -> Principal:
    """The principal of a valid token; 401 (with ``WWW-Authenticate: Bearer``) for any invalid one."""
    try:
        claims = jwt.decode(token, secret, algorithms=_ALGORITHMS, options={"require": ["exp", "sub"]})
    except jwt.ExpiredSignatureError:
        raise unauthorized("token expired") from None
    except jwt.InvalidTokenError as exc:
        # PyJWT's messages name the failing check (signature, claim), never the token itself.
        raise unauthorized(f"invalid token: {exc}") from None
    owner_id = claims.get("owner_id")
    if owner_id is not None:
        try:
            owner_id = uuid.UUID(str(owner_id))
        except ValueError:
            raise unauthorized("invalid token: claim owner_id is not a UUID") from None
    return Principal(subject=str(claims["sub"]), role=str(claims.get("role", "")), owner_id=owner_id)


def require_admin(principal: Principal) -> Principal:
    """``principal`` when it has the admin role; 403 otherwise."""
    if principal.role != ADMIN_ROLE:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail=f"role {ADMIN_ROLE!r} required")
    return principal
