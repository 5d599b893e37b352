"""The actor system: dispatcher, local pool, writer, cache and their supervisor."""

from ._cache import SHARED_SCOPE as SHARED_SCOPE
from ._cache import Cache as Cache
from ._dispatcher import Dispatcher as Dispatcher
from ._envelope import Answer as Answer
from ._envelope import ClassifyRequest as ClassifyRequest
from ._envelope import Envelope as Envelope
from ._local_pool import LocalModel as LocalModel
from ._local_pool import LocalPool as LocalPool
from ._runtime import Runtime as Runtime
from ._runtime import RuntimeStatistics as RuntimeStatistics
from ._writer import Writer as Writer

__all__ = [
    "SHARED_SCOPE",
    "Answer",
    "Cache",
    "ClassifyRequest",
    "Dispatcher",
    "Envelope",
    "LocalModel",
    "LocalPool",
    "Runtime",
    "RuntimeStatistics",
    "Writer",
]
