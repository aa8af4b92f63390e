"""Zhipu's open-platform API: its chat completions route."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .. import schemas as S
from ..services.chat import ChatOptions
from .deps import BilledKey, Svc

router = APIRouter()


@router.post("/api/paas/v4/chat/completions", response_model=S.ChatCompletion,
             responses={200: {"content": {"text/event-stream": {}}}, 434: {"model": S.ErrorResponse}})
async def zhipu_chat(request: Request, body: S.ZhipuChatRequest, svc: Svc, key: BilledKey):
    """Zhipu open-platform chat: ``request_id`` (never billed twice), ``do_sample: false`` for greedy."""
    return await svc.chat.create(request, key, body, ChatOptions(
        tools=body.tools, max_tokens=body.max_tokens, temperature=body.temperature if body.do_sample else 0.0,
        logprobs=None, n=1, request_id=body.request_id, zhipu=True))
