"""Operators' endpoints under ``/admin``: re-classify entries, purge one.

With ``security.admin_key_sha256`` set, the guard lets only admin keys through
(:func:`~._auth.is_admin_path`); without, the ordinary keys, as for ``/metrics``.

- ``POST /admin/reclassify`` with ``{"image_hashes": [...]}`` (1 to
  :data:`MAX_LISTED`: a JSON body is at most ``server.max_json_bytes``), or with a
  query ``{"source": "local"|"llm", "since": ISO, "until": ISO, "limit": N}`` (at
  least one of ``source``, ``since``, ``until``: an empty body is refused, 422, not
  taken as "everything"; entries made from ``since`` until before ``until``;
  ``limit`` 1 to :data:`MAX_HASHES`, default :data:`DEFAULT_LIMIT`); no other key. It queues an
  LLM re-classification of each entry whose photo's bytes this replica has
  spooled; the answer replaces the stored one, an LLM answer included. Paced by
  ``store.upgrades_per_minute``; answers what it did: ``matched``, ``queued``,
  ``no_bytes`` (no spooled bytes here: these cannot be re-classified by this
  replica), ``dropped`` (the operators' queue was full), ``already_queued``.
- ``POST /admin/purge`` with ``{"image_hash": H}``: deletes the entry, its aliases,
  its in-flight claim and its spooled bytes; ``purged`` says whether there was one.
  This replica's LRU forgets it at once; other replicas' LRUs keep it until it
  is evicted there or they restart.
  The purge sticks on this replica for ``PURGED_TTL_S`` (10 minutes,
  :mod:`xintu.actors._upgrades`): an LLM re-classification of the photo already
  queued, sent or under way (an upgrade, a recheck, an operator's) is dropped
  when it answers, and bytes of it on their way to the spool are not kept. What
  remains: a classification of the photo already in flight in the dispatcher
  (an upload being classified at the time of the purge) still writes its answer,
  which makes the entry again; purge again once it is done. Within those 10
  minutes the photo, if uploaded again, is classified and stored, but its local
  answer is not upgraded by the LLM.

The spool is per replica: a re-classification asked of one replica can only
re-classify the photos whose bytes that replica kept.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from quart import Blueprint, Response, g

from ..errors import ValidationFailed
from ._app import current_xintu
from ._respond import json_response, now_iso
from ._v1 import _hash_field, _json_body

__all__ = ["DEFAULT_LIMIT", "MAX_HASHES", "MAX_LISTED", "admin"]

admin = Blueprint("admin", __name__, url_prefix="/admin")

# Most entries one re-classification request may select, and name (500 hashes are
# about 34 KB of JSON, within the default server.max_json_bytes).
MAX_HASHES = 10_000
MAX_LISTED = 500
DEFAULT_LIMIT = 1000
_SOURCES = ("local", "llm")
_QUERY = ("source", "since", "until", "limit")


def _time_field(body: dict[str, Any], name: str) -> datetime | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationFailed(f"{name} must be an ISO 8601 date or time")
    text = value.strip().upper().replace("Z", "+00:00")
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        # RFC 3339 allows a leap second, which datetime does not.
        try:
            parsed = datetime.fromisoformat(text.replace(":60", ":59", 1))
        except ValueError:
            raise ValidationFailed(f"{name} must be an ISO 8601 date or time") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


@admin.post("/reclassify")
async def reclassify() -> Response:
    body = await _json_body()
    runtime = current_xintu().runtime
    unknown = sorted(set(body) - {"image_hashes", *_QUERY})
    if unknown:
        raise ValidationFailed(f"unknown field {unknown[0]!r}")
    hashes = body.get("image_hashes")
    query = {k: body[k] for k in _QUERY if k in body}
    if "image_hashes" in body and query:
        raise ValidationFailed("give image_hashes or a query (source, since, until), not both")
    if "image_hashes" in body:
        if not isinstance(hashes, list) or not 1 <= len(hashes) <= MAX_LISTED:
            raise ValidationFailed(f"image_hashes must be a list of 1 to {MAX_LISTED} hashes")
        wanted = [_hash_field(h, f"image_hashes[{i}]") for i, h in enumerate(hashes)]
    else:
        source = body.get("source")
        if source is not None and source not in _SOURCES:
            raise ValidationFailed("source must be 'local' or 'llm'")
        limit = body.get("limit", DEFAULT_LIMIT)
        if isinstance(limit, float) and limit.is_integer():
            limit = int(limit)  # 1000.0 is an integer to JSON Schema
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_HASHES:
            raise ValidationFailed(f"limit must be an integer from 1 to {MAX_HASHES}")
        since, until = _time_field(body, "since"), _time_field(body, "until")
        if source is None and since is None and until is None:
            # An empty query would select the oldest entries of every source.
            raise ValidationFailed(
                "give image_hashes or a query with at least one of source, since, until"
            )
        wanted = await runtime.find_hashes(source=source, since=since, until=until, limit=limit)
    report = await runtime.reclassify(wanted)
    return json_response(
        {
            "success": True,
            **report.as_dict(),
            "request_id": cast(str, g.request_id),
            "timestamp": now_iso(),
        }
    )


@admin.post("/purge")
async def purge() -> Response:
    body = await _json_body()
    unknown = sorted(set(body) - {"image_hash"})
    if unknown:
        raise ValidationFailed(f"unknown field {unknown[0]!r}")
    image_hash = _hash_field(body.get("image_hash"), "image_hash")
    purged = await current_xintu().runtime.purge(image_hash)
    return json_response(
        {
            "success": True,
            "image_hash": image_hash,
            "purged": purged,
            "request_id": cast(str, g.request_id),
            "timestamp": now_iso(),
        }
    )
