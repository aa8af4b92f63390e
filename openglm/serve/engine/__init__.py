"""The serving engine, in layers as vLLM's v1 draws them, each readable and tested alone:

- ``client.py``: ``EngineClient``, what the HTTP side calls (``submit``, ``cancel``, ``run_exclusive``,
  ``start``, ``stop``, health and limits), and ``Engine``, the client over a core on a thread of this
  process; ``process.py``: ``EngineProcess``, the same over a core in a process of its own;
- ``output.py``: the front end's ``OutputProcessor`` (incremental detokenization, stop strings) and
  each request's ``RequestHandle``;
- ``core.py``: ``EngineCore``, the step loop on the engine thread;
- ``scheduler.py``: the step plan, a pure function of the running and waiting requests and budgets;
- ``runner.py``: ``ModelRunner``, the forwards over the slot KV cache (``cache.py``) and sampling;
- ``request.py``: requests, outputs and events, and the check every request passes.
"""

from .cache import SlotKVCache, SlotLatentKVCache
from .client import Engine, EngineClient
from .core import EngineCore
from .output import OutputProcessor, RequestHandle
from .request import EngineFull, EngineOutput, EngineRequest, PromptTooLong, TokenEvent, check_request

__all__ = ["Engine", "EngineClient", "EngineCore", "EngineFull", "EngineOutput", "EngineRequest", "OutputProcessor",
           "PromptTooLong", "RequestHandle", "SlotKVCache", "SlotLatentKVCache", "TokenEvent", "check_request"]
