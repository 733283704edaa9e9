"""Bearer-token authentication of the API: HS256 JWTs signed with ``HEIMDEX_JWT_SECRET``.

Required claims: ``sub`` (who), ``aud`` and ``iss`` (``HEIMDEX_JWT_AUDIENCE`` / ``HEIMDEX_JWT_ISSUER``,
both ``heimdex`` by default), ``iat`` and ``exp`` no further apart than ``HEIMDEX_JWT_MAX_LIFETIME_S``
(24 h by default), and the token's reach: ``owner_id`` confines it to one owner's videos,
``scope: "global"`` reaches every owner. A token with neither reaches nothing (403); one with both,
or any other defect (signature, algorithm, audience, issuer, expired, not yet valid beyond
``LEEWAY_S`` of clock skew, lifetime too long), is a 401. ``role`` is ``admin`` for the admin routes.
Error details never echo the token or the secret.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import jwt
from fastapi import HTTPException, status

JWT_SECRET_ENV = "HEIMDEX_JWT_SECRET"
JWT_AUDIENCE_ENV = "HEIMDEX_JWT_AUDIENCE"
JWT_ISSUER_ENV = "HEIMDEX_JWT_ISSUER"
JWT_MAX_LIFETIME_ENV = "HEIMDEX_JWT_MAX_LIFETIME_S"
DEFAULT_AUDIENCE = DEFAULT_ISSUER = "heimdex"
DEFAULT_MAX_LIFETIME_S = 24 * 3600
LEEWAY_S = 30  # clock skew tolerated on exp, nbf and iat
ADMIN_ROLE = "admin"
GLOBAL_SCOPE = "global"  # the value of the ``scope`` claim of a token that reaches every owner
# RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.
MIN_SECRET_BYTES = 32
# Only this one: "none" and every other algorithm (RS256 with the secret as a public key...) are refused.
_ALGORITHMS = ["HS256"]
_REQUIRED_CLAIMS = ["sub", "aud", "iss", "iat", "exp"]


class AuthConfigError(RuntimeError):
    """The API cannot start: no JWT secret, one too short to be safe, or a malformed limit; one line."""


@dataclass(frozen=True)
class Principal:
    """The verified caller: subject, role and, for an owner-scoped token, the only owner it may touch
    (``owner_id`` is None only for a token with the explicit global claim)."""

    subject: str
    role: str
    owner_id: uuid.UUID | None = None


@dataclass(frozen=True)
class TokenPolicy:
    """What a valid token must satisfy: its signing secret, audience, issuer and longest lifetime."""

    secret: str
    audience: str = DEFAULT_AUDIENCE
    issuer: str = DEFAULT_ISSUER
    max_lifetime_s: int = DEFAULT_MAX_LIFETIME_S
    leeway_s: int = LEEWAY_S

    @classmethod
    def from_env(cls, secret: str | None = None) -> TokenPolicy:
        """The policy of ``HEIMDEX_JWT_*`` (``secret`` overrides the secret); AuthConfigError for a missing
        or weak secret or a lifetime that is not a positive number of seconds."""
        raw_lifetime = os.environ.get(JWT_MAX_LIFETIME_ENV, "").strip() or str(DEFAULT_MAX_LIFETIME_S)
        try:
            max_lifetime_s = int(raw_lifetime)
        except ValueError:
            max_lifetime_s = 0
        if max_lifetime_s <= 0:
            raise AuthConfigError(f"{JWT_MAX_LIFETIME_ENV} must be a positive number of seconds, got {raw_lifetime!r}")
        return cls(
            secret=jwt_secret_from_env(secret),
            audience=os.environ.get(JWT_AUDIENCE_ENV, "").strip() or DEFAULT_AUDIENCE,
            issuer=os.environ.get(JWT_ISSUER_ENV, "").strip() or DEFAULT_ISSUER,
            max_lifetime_s=max_lifetime_s,
        )


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


def verify_token(token: str, policy: TokenPolicy) -> Principal:
    """The principal of a valid token; 401 (with ``WWW-Authenticate: Bearer``) for any invalid one,
    403 for a valid one that claims neither an owner nor global reach."""
    try:
        claims = jwt.decode(
            token,
            policy.secret,
            algorithms=_ALGORITHMS,
            audience=policy.audience,
            issuer=policy.issuer,
            leeway=policy.leeway_s,
            options={"require": _REQUIRED_CLAIMS},
        )
    except jwt.ExpiredSignatureError:
        raise unauthorized("token expired") from None
    except jwt.InvalidTokenError as exc:
        # PyJWT's messages name the failing check (signature, claim), never the token itself.
        raise unauthorized(f"invalid token: {exc}") from None
    # PyJWT has checked that both are integers.
    if int(claims["exp"]) - int(claims["iat"]) > policy.max_lifetime_s:
        raise unauthorized(f"invalid token: lifetime (exp - iat) over {policy.max_lifetime_s} s")
    owner_id, is_global = claims.get("owner_id"), claims.get("scope") == GLOBAL_SCOPE
    if owner_id is not None and is_global:
        raise unauthorized(f"invalid token: claims owner_id and scope {GLOBAL_SCOPE!r} exclude each other")
    if owner_id is None and not is_global:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"no access: the token claims neither an owner_id nor scope {GLOBAL_SCOPE!r}",
        )
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
