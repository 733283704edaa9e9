"""The REST API: ``create_app`` builds it; ``uvicorn heimdex_assets.api.app:app`` serves it."""

from heimdex_assets.api.app import ReprocessBody, ReprocessResponse, TokenBuckets, create_app
from heimdex_assets.api.auth import JWT_SECRET_ENV, AuthConfigError, Principal, TokenPolicy

__all__ = [
    "JWT_SECRET_ENV",
    "AuthConfigError",
    "Principal",
    "ReprocessBody",
    "ReprocessResponse",
    "TokenBuckets",
    "TokenPolicy",
    "create_app",
]
