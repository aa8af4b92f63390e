"""The services under the HTTP routes, each small and on its own: who calls (``Auth``), what it costs
(``Billing``), text to tokens and back (``Tokens``), where generations run (``Generations`` over a
``GenerationBackend``), and one service per API call that builds its answer from the schemas.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..conversations import Conversations
from ..metrics import Metrics
from .auth import Auth
from .billing import Billing
from .chat import Chat
from .completions import Completions
from .embeddings import Embeddings
from .backend import EngineBackend, GenerationBackend
from .generation import Generations
from .infill import Infill
from .tokens import Tokens


@dataclass
class Services:
    """Everything the routes of one app share."""

    store: object
    model_name: str
    auth: Auth
    billing: Billing
    tokens: Tokens
    generations: Generations
    chat: Chat
    completions: Completions
    embeddings: Embeddings
    infill: Infill
    conversations: Conversations
    metrics: Metrics
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def build(cls, backend: GenerationBackend, store, model_name: str, tokenizer, admin_key: str | None) -> Services:
        billing = Billing(store, model_name)
        tokens = Tokens(tokenizer)
        metrics = Metrics(backend)
        generations = Generations(backend, billing, metrics, model_name)
        return cls(store=store, model_name=model_name, auth=Auth(store, admin_key), billing=billing, tokens=tokens,
                   generations=generations, chat=Chat(generations, billing, tokens),
                   completions=Completions(generations, billing, tokens),
                   embeddings=Embeddings(generations, billing, tokens), infill=Infill(generations, billing, tokens),
                   conversations=Conversations(store), metrics=metrics)

    @property
    def backend(self) -> GenerationBackend:
        return self.generations.backend


__all__ = ["EngineBackend", "GenerationBackend", "Services"]
