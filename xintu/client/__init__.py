"""The Xintu client library: sync and async clients for the v1 API, on httpx.

::

    from xintu.client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as client:
        result = client.classify("cat.jpg")        # hash, check-cache, upload on a miss
        items = client.classify_many(paths, concurrency=4)

:class:`AsyncClient` has the same methods as coroutines and runs under Trio or
asyncio. Both retry 429 and 503 after ``Retry-After`` within a bounded budget
(:class:`RetryPolicy`), sending the same ``Idempotency-Key`` with every retry of
one logical request, and raise the typed errors of :mod:`._errors`, each carrying
the server's ``error_code``, the HTTP ``status`` and the ``request_id``.
"""

from ._async import AsyncClient as AsyncClient
from ._errors import APIError as APIError
from ._errors import AuthenticationError as AuthenticationError
from ._errors import BadImageError as BadImageError
from ._errors import BadRequestError as BadRequestError
from ._errors import ConflictError as ConflictError
from ._errors import DeadlineExceededError as DeadlineExceededError
from ._errors import FileUnreadable as FileUnreadable
from ._errors import NotFoundError as NotFoundError
from ._errors import PayloadTooLargeError as PayloadTooLargeError
from ._errors import RateLimitedError as RateLimitedError
from ._errors import RetryLater as RetryLater
from ._errors import ServerBusy as ServerBusy
from ._errors import ServerError as ServerError
from ._errors import TransportError as TransportError
from ._errors import UnsupportedFormatError as UnsupportedFormatError
from ._errors import ValidationError as ValidationError
from ._errors import XintuClientError as XintuClientError
from ._protocol import ImageInput as ImageInput
from ._protocol import hash_file as hash_file
from ._sync import Client as Client
from ._types import BatchItem as BatchItem
from ._types import ClassifyResult as ClassifyResult
from ._types import RetryPolicy as RetryPolicy

__all__ = [
    "APIError",
    "AsyncClient",
    "AuthenticationError",
    "BadImageError",
    "BadRequestError",
    "BatchItem",
    "ClassifyResult",
    "Client",
    "ConflictError",
    "DeadlineExceededError",
    "FileUnreadable",
    "ImageInput",
    "NotFoundError",
    "PayloadTooLargeError",
    "RateLimitedError",
    "RetryLater",
    "RetryPolicy",
    "ServerBusy",
    "ServerError",
    "TransportError",
    "UnsupportedFormatError",
    "ValidationError",
    "XintuClientError",
    "hash_file",
]
