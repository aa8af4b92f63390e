"""OpenAI's API: models, chat completions, (legacy) completions, embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from .. import schemas as S
from ..errors import APIError
from ..services.chat import ChatOptions
from .deps import BilledKey, Key, Svc

router = APIRouter()
_STREAMED = {200: {"content": {"text/event-stream": {}}}}


@router.get("/v1/models", response_model=S.ModelList)
async def list_models(svc: Svc, key: Key):
    """The models this key may use."""
    return S.ModelList(data=[S.ModelCard(id=name, created=svc.created)
                             for name in svc.generations.model_names() if key.allows(name)])


@router.get("/v1/models/{model}", response_model=S.ModelCard)
async def get_model(model: str, svc: Svc, key: Key):
    svc.generations.check_model(model)
    if not key.allows(model):  # as OpenAI answers: what a key may not use, it does not see
        raise APIError(404, f"the model {model!r} does not exist or this key may not use it",
                       code="model_not_found", param="model")
    return S.ModelCard(id=model, created=svc.created)


@router.post("/v1/chat/completions", response_model=S.ChatCompletion, responses=_STREAMED)
async def chat_completions(request: Request, body: S.ChatCompletionRequest, svc: Svc, key: BilledKey):
    """OpenAI chat completions; ``stream: true`` answers with server-sent events ending ``data: [DONE]``."""
    tools = body.tools if body.tool_choice != "none" else None
    return await svc.chat.create(request, key, body, ChatOptions(
        tools=tools, max_tokens=body.token_limit, temperature=body.temperature, logprobs=body.logprobs_k, n=body.n,
        request_id=None, zhipu=False))


@router.post("/v1/completions", response_model=S.Completion, responses=_STREAMED)
async def completions(request: Request, body: S.CompletionRequest, svc: Svc, key: BilledKey):
    """OpenAI (legacy) text completions of a prompt or a list of prompts (texts or token ids).

    ``echo`` returns each prompt before its completion; with ``logprobs`` too, the prompt tokens'
    logprobs come first (from a forward over the prompt), so ``echo`` + ``logprobs`` + ``max_tokens: 0``
    scores a text: what log-likelihood evaluation (lm-evaluation-harness) asks for.
    """
    return await svc.completions.create(request, key, body)


@router.post("/v1/embeddings", response_model=S.EmbeddingList)
async def embeddings(response: Response, body: S.EmbeddingRequest, svc: Svc, key: BilledKey):
    """Mean-pooled final hidden states of each input, L2-normalised (cosine similarity = dot product)."""
    result, headers = await svc.embeddings.create(key, body)
    response.headers.update(headers)
    return result
