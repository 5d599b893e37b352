"""The actor system (DESIGN §4), one module per actor or concern.

- ``_envelope``: the one reply protocol (a request, a deadline, a reply channel of
  buffer 1, exactly one answer);
- ``_dispatcher``: admission, singleflight, claims across replicas;
- ``_chain``: the classifier chain, the LLM pool (:mod:`xintu.llm`) then the local
  pool (``_local_pool``), both :class:`Classifier`; the local model runs in its
  threads or in worker processes (``_procs``, ``_procworker``);
- ``_cache``: the LRU in front of the store; ``_writer`` and ``_journal``: the only
  writes to the store;
- ``_supervisor``: restarts with backoff; ``_runtime``: wires and supervises them
  all, and is the one facade of the HTTP layer.
"""

from ._cache import SHARED_SCOPE as SHARED_SCOPE
from ._cache import Cache as Cache
from ._chain import Chain as Chain
from ._chain import Classifier as Classifier
from ._dispatcher import Dispatcher as Dispatcher
from ._envelope import Answer as Answer
from ._envelope import ClassifyRequest as ClassifyRequest
from ._envelope import Envelope as Envelope
from ._local_pool import LocalModel as LocalModel
from ._local_pool import LocalPool as LocalPool
from ._runtime import Readiness as Readiness
from ._runtime import Runtime as Runtime
from ._runtime import RuntimeStatistics as RuntimeStatistics
from ._writer import Writer as Writer

__all__ = [
    "SHARED_SCOPE",
    "Answer",
    "Cache",
    "Chain",
    "Classifier",
    "ClassifyRequest",
    "Dispatcher",
    "Envelope",
    "LocalModel",
    "LocalPool",
    "Readiness",
    "Runtime",
    "RuntimeStatistics",
    "Writer",
]
