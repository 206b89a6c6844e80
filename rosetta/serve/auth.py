"""API keys: a request to a protected route carries `X-API-Key: KEY` or `Authorization: Bearer KEY`."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

# auto_error=False: a missing key is our 401 with our error body, not FastAPI's 403.
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the server's API key")
_bearer = HTTPBearer(auto_error=False, description="the server's API key as a bearer token")


def key_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison, so response timing does not reveal how much of a guess was right."""
    if given is None:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))


async def require_api_key(
    request: Request,
    header: Annotated[str | None, Depends(_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """A route dependency: 401 unless the request carries the server's key (a no-op when none is set)."""
    expected: str | None = request.app.state.rosetta.settings.api_key
    if not expected:
        return
    given = header if header is not None else (bearer.credentials if bearer is not None else None)
    if given is None:
        raise HTTPException(401, "missing API key: send it as 'X-API-Key: KEY' or 'Authorization: Bearer KEY'",
                            headers={"WWW-Authenticate": "Bearer"})
    if not key_matches(expected, given):
        raise HTTPException(401, "wrong API key", headers={"WWW-Authenticate": "Bearer"})
