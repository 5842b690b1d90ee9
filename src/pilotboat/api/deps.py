"""FastAPI dependencies shared by the doors: the service container and the calling principal."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pilotboat.model.principal import Principal
from pilotboat.services.container import Services
from pilotboat.services.errors import Unauthenticated

_bearer = HTTPBearer(auto_error=False, description="Access token from POST /api/v1/auth/token, or an API key")


def services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(services)]


async def principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    """The caller behind ``Authorization: Bearer <token or API key>``.

    Mainflux 0.13 clients send the bare token without a scheme; that is accepted too.
    """
    if credentials is not None:
        token = credentials.credentials
    else:
        raw = request.headers.get("authorization", "").strip()
        token = raw if raw and " " not in raw else ""
    if not token:
        raise Unauthenticated("missing bearer token: send 'Authorization: Bearer <token>'")
    return await request.app.state.services.accounts.authenticate(token)


PrincipalDep = Annotated[Principal, Depends(principal)]
