"""The multimodal LLM classifier: providers, retries, circuit breakers, the pool actor.

::

    LlmPool ── classify(request, deadline) ──▶ provider chain
       │         each provider: Breaker ▸ ProviderClient (one httpx.AsyncClient)
       │                        retries: backoff + jitter, Retry-After, deadline, budget
       └── offer_recheck(data, image_hash) ──▶ background re-classification ──▶ on_recheck

Configuration is :class:`LlmConfig`, built by :func:`llm_config_from` from the
``[llm]`` table and the environment. Every error is an :class:`LlmError`, itself a
:class:`xintu.errors.ClassifierError`: the classifier chain
(:mod:`xintu.actors._chain`) falls back to the local model.
"""

from ._breaker import Breaker as Breaker
from ._breaker import BreakerState as BreakerState
from ._breaker import BreakerStatistics as BreakerStatistics
from ._config import LlmConfig as LlmConfig
from ._config import ProviderConfig as ProviderConfig
from ._config import llm_config_from as llm_config_from
from ._errors import BadAnswer as BadAnswer
from ._errors import ImageNotUploadable as ImageNotUploadable
from ._errors import LlmError as LlmError
from ._errors import LlmUnavailable as LlmUnavailable
from ._errors import UpstreamError as UpstreamError
from ._errors import UpstreamRateLimited as UpstreamRateLimited
from ._errors import UpstreamRejected as UpstreamRejected
from ._errors import UpstreamServerError as UpstreamServerError
from ._errors import UpstreamTimeout as UpstreamTimeout
from ._errors import UpstreamUnreachable as UpstreamUnreachable
from ._pool import LlmPool as LlmPool
from ._pool import LlmPoolStatistics as LlmPoolStatistics
from ._pool import ProviderStatistics as ProviderStatistics
from ._pool import QueuedCall as QueuedCall
from ._pool import RecheckCallback as RecheckCallback
from ._retry import RetryBudgetStatistics as RetryBudgetStatistics

__all__ = [
    "BadAnswer",
    "Breaker",
    "BreakerState",
    "BreakerStatistics",
    "ImageNotUploadable",
    "LlmConfig",
    "LlmError",
    "LlmPool",
    "LlmPoolStatistics",
    "LlmUnavailable",
    "ProviderConfig",
    "ProviderStatistics",
    "QueuedCall",
    "RecheckCallback",
    "RetryBudgetStatistics",
    "UpstreamError",
    "UpstreamRateLimited",
    "UpstreamRejected",
    "UpstreamServerError",
    "UpstreamTimeout",
    "UpstreamUnreachable",
    "llm_config_from",
]
