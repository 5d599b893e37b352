"""The v1 API's limits, defined once.

The handlers enforce them (:mod:`xintu.http._v1`), the OpenAPI document states them
(:mod:`xintu.http._openapi`) and the client splits its work by them
(:mod:`xintu.client`). They are the original backend's, which its album app relies
on: 100 hashes per batch-check-cache, 20 images per batch upload.
"""

from __future__ import annotations

__all__ = ["MAX_BATCH_IMAGES", "MAX_CHECK_HASHES", "MAX_USER_ID_CHARS"]

#: Hashes in one ``batch-check-cache`` request.
MAX_CHECK_HASHES = 100
#: Images in one ``/classify/batch`` request.
MAX_BATCH_IMAGES = 20
#: Characters of a user id (``X-User-ID`` or ``user_id``).
MAX_USER_ID_CHARS = 128
