"""GLM's own API: blank infilling."""

from __future__ import annotations

from fastapi import APIRouter, Response

from .. import schemas as S
from .deps import BilledKey, Svc

router = APIRouter()


@router.post("/v1/infill", response_model=S.Infill)
async def infill(response: Response, body: S.InfillRequest, svc: Svc, key: BilledKey):
    """GLM blank infilling: each ``[MASK]`` (short span), ``[sMASK]`` (sentence) or ``[gMASK]`` (to the
    end) in ``prompt`` is filled, the text around it read in both directions. ``max_tokens`` is per blank."""
    result, headers = await svc.infill.create(key, body)
    response.headers.update(headers)
    return result
