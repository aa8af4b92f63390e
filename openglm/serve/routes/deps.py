"""What routes depend on: the app's ``Services`` and the caller's key."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..services import Services
from ..store import KeyInfo


def services(request: Request) -> Services:
    return request.app.state.services


async def _services(request: Request) -> Services:
    # async: FastAPI runs a plain function dependency on a worker thread, a hop on every request
    return services(request)


async def api_key(request: Request):
    """The caller's key, checked now."""
    return await services(request).auth.key(request)


async def billed_key(request: Request):
    """The caller's key for a generation route: ``Store.reserve`` checks it again (see ``Auth.billed_key``)."""
    return await services(request).auth.billed_key(request)


async def admin(request: Request):
    """The admin secret or an admin key (403 for another key)."""
    return await services(request).auth.admin(request)


Svc = Annotated[Services, Depends(_services)]
Key = Annotated[KeyInfo, Depends(api_key)]
BilledKey = Annotated[KeyInfo, Depends(billed_key)]
ADMIN = Depends(admin)
