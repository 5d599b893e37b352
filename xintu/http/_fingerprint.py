"""The ``Idempotency-Key`` fingerprint: a SHA-256 of what a request means, not of its
bytes, so that any client can retry by building the request again:

- always the method, the path and the query string;
- ``multipart/form-data``: the media type, its fields (name and value, as the
  handler reads them) and its files (field name, filename and the SHA-256 of the
  content), in a canonical order: by kind and name, parts of the same name in the
  order sent (the batch's ``images`` order is its items' ``index``). The boundary,
  which curl, requests, httpx, OkHttp and browsers pick at random for every
  request, the preamble and epilogue and the other per-part headers (a file's
  ``Content-Type``, which clients guess differently) do not count. The body is
  parsed by werkzeug's multipart decoder, the one Quart's form parser runs, under
  the app's form limits (``MAX_FORM_MEMORY_SIZE``, ``MAX_FORM_PARTS``);
- ``application/json`` and ``*/*+json``: the media type and the parsed value,
  dumped canonically (sorted keys, no whitespace), so that key order, spacing and
  escapes do not count; parsed as the handlers parse it, within
  ``server.max_json_bytes``;
- anything else, and a body that does not parse (malformed or cut short, over a
  form limit, not JSON): the whole ``Content-Type`` header, parameters included,
  and the SHA-256 of the raw bytes. The handler answers a body that does not parse
  400 or 413; a retry of the same bytes gets that answer replayed.

The idempotency layer (:mod:`._idempotency`) runs it on a worker thread for large
bodies (:func:`~._respond.sized_work`).
"""

from __future__ import annotations

import hashlib
import json
from itertools import chain

from quart.formparser import MultiPartParser
from werkzeug.exceptions import HTTPException
from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

__all__ = ["fingerprint"]

# Bodies are fed to the multipart decoder in slices of this size, so its buffer stays
# small (Quart's parser is fed in the body's chunks).
_FEED_BYTES = 64 * 1024


def fingerprint(
    method: str,
    path: str,
    query: bytes,
    content_type: str,
    body: bytes,
    *,
    max_form_memory_size: int | None = None,
    max_form_parts: int | None = None,
    max_json_bytes: int | None = None,
) -> str:
    """The request's fingerprint (see the module docstring). The limits are the app's
    (Quart's form limits, ``server.max_json_bytes``): a body over one is refused by
    the handler and counts by its raw bytes, as one that is malformed.

    Any change to this recipe makes the keys recorded before it (for ``ttl_s``) look
    reused: their retries get 422."""
    media_type, options = parse_options_header(content_type)
    media_type = media_type.lower()
    meaning: bytes | None = None
    if media_type == "multipart/form-data":
        meaning = _form_meaning(
            body, options.get("boundary", ""), max_form_memory_size, max_form_parts
        )
    elif media_type == "application/json" or media_type.endswith("+json"):
        if max_json_bytes is None or len(body) <= max_json_bytes:
            meaning = _json_meaning(body)
    h = hashlib.sha256()
    for part in (method.encode(), path.encode("utf-8", "surrogateescape"), query):
        h.update(part)
        h.update(b"\n")
    if meaning is None:
        h.update(b"raw\n")
        h.update(content_type.encode("latin-1", "replace"))
        h.update(b"\n")
        h.update(hashlib.sha256(body).digest())
    else:
        h.update(b"parsed\n")
        h.update(media_type.encode("latin-1", "replace"))
        h.update(b"\n")
        h.update(hashlib.sha256(meaning).digest())
    return h.hexdigest()


def _json_meaning(body: bytes) -> bytes | None:
    """The JSON value, dumped canonically; None if the body is not JSON.

    Parsed from the bytes as the handlers do (``json.loads``, which detects UTF-8,
    -16 and -32), so two bodies with the same meaning here mean the same there."""
    try:
        value = json.loads(body)
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    except (ValueError, RecursionError):
        return None
    return text.encode("ascii")


def _form_meaning(
    body: bytes, boundary: str, max_form_memory_size: int | None, max_form_parts: int | None
) -> bytes | None:
    """The fields and files of a multipart body, canonically; None if it does not
    parse completely within the limits.

    Decoded by werkzeug's :class:`MultipartDecoder` as Quart's form parser does, and
    field values decoded with Quart's charset rule, so the parts seen here are the
    ones the handler sees. Entries are ``["field", name, value]`` and ``["file",
    name, filename, sha256]``, sorted stably by kind and name: the order of parts of
    one name is kept (the batch's items are numbered in it), the interleaving of
    different names, which the handlers never see, is not."""
    if not boundary:
        return None
    entries: list[list[str | None]] = []
    part: Field | File | None = None
    value: list[bytes] = []
    value_size = 0
    content = hashlib.sha256()
    slices = (body[i : i + _FEED_BYTES] for i in range(0, len(body), _FEED_BYTES))
    try:
        decoder = MultipartDecoder(boundary.encode("ascii"), max_parts=max_form_parts)
        for data in chain(slices, [None]):
            decoder.receive_data(data)  # None: the body is complete
            while not isinstance(event := decoder.next_event(), NeedData):
                if isinstance(event, Epilogue):
                    return _canonical(entries)
                if isinstance(event, Field | File):
                    part, value, value_size, content = event, [], 0, hashlib.sha256()
                elif isinstance(event, Data) and isinstance(part, Field):
                    value_size += len(event.data)
                    if max_form_memory_size is not None and value_size > max_form_memory_size:
                        return None  # Quart answers 413
                    value.append(event.data)
                elif isinstance(event, Data) and isinstance(part, File):
                    content.update(event.data)
                if isinstance(event, Data) and not event.more_data and part is not None:
                    if isinstance(part, File):
                        entries.append(["file", part.name, part.filename, content.hexdigest()])
                    else:
                        charset = MultiPartParser().get_part_charset(part.headers)
                        text = b"".join(value).decode(charset, "replace")
                        entries.append(["field", part.name, text])
                    part = None
    except (ValueError, HTTPException):
        # Malformed (ValueError, UnicodeError; also a body that ends before its
        # closing boundary) or over max_form_parts (RequestEntityTooLarge).
        return None
    return None  # not reached: a complete decoder ends in Epilogue or raises


def _canonical(entries: list[list[str | None]]) -> bytes:
    def order(entry: list[str | None]) -> tuple[str, bool, str]:
        kind, name = entry[0] or "", entry[1]
        return (kind, name is not None, name or "")

    ordered = sorted(entries, key=order)  # stable: parts of one name keep their order
    return json.dumps(ordered, separators=(",", ":"), ensure_ascii=True).encode("ascii")
