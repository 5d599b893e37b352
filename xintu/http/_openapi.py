"""The OpenAPI 3.1 document of every endpoint, built from the same limits the code enforces."""

from __future__ import annotations

from typing import Any

from .._config import Config
from .._limits import MAX_BATCH_IMAGES, MAX_CHECK_HASHES, MAX_USER_ID_CHARS
from .._types import CATEGORIES
from ..llm._errors import FAILURE_KINDS
from ._admin import DEFAULT_LIMIT as ADMIN_DEFAULT_LIMIT
from ._admin import MAX_HASHES as ADMIN_MAX_HASHES
from ._admin import MAX_LISTED as ADMIN_MAX_LISTED

__all__ = ["openapi_document"]

_HASH = {"type": "string", "pattern": "^[0-9a-fA-F]{64}$", "description": "SHA-256, 64 hex"}

_ERROR = {
    "type": "object",
    "required": ["success", "error", "error_code", "request_id", "detail"],
    "properties": {
        "success": {"const": False},
        "error": {"type": "string"},
        "error_code": {"type": "string"},
        "request_id": {"type": "string"},
        "detail": {"type": "string", "description": "the message again, as the original's"},
    },
}

_DATA = {
    "type": "object",
    "required": ["category", "confidence"],
    "properties": {
        "category": {"type": "string", "enum": list(CATEGORIES)},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "description": {"type": ["string", "null"]},
        "local_inference_result": {"type": ["object", "null"]},
        "image_hash": _HASH,
        "source": {"type": "string", "enum": ["cache", "llm", "local"]},
        "provider": {"type": ["string", "null"]},
        "model": {"type": "string"},
    },
}


_NULLABLE_DATA = {"oneOf": [{"$ref": "#/components/schemas/Data"}, {"type": "null"}]}
_EVIDENCE = {
    "name": "evidence",
    "in": "query",
    "required": False,
    "description": "true: include the local model's evidence (local_inference_result)",
    "schema": {"type": "string", "enum": ["true", "false", "1", "0"]},
}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "Not an image, truncated image, malformed multipart or JSON",
        401: "No valid API key (Authorization: Bearer KEY); see WWW-Authenticate",
        403: "A valid API key without admin access",
        408: "The request body did not arrive within server.body_timeout_s",
        409: "Idempotency-Key whose first request is still in flight (Retry-After)",
        413: "Body or image over the byte limit, or image over the pixel limit",
        415: "Image format not accepted",
        422: "A field fails validation, image_hash does not match the bytes, or an "
        "Idempotency-Key is reused for a different request",
        429: "Over the client's rate limit (Retry-After)",
        503: "Over capacity or draining (Retry-After)",
        504: "The deadline passed before any classifier answered",
    }
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    return {str(s): {"description": text[s], "content": ref} for s in statuses}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {
        "200": {"description": description, "content": {"application/json": {"schema": schema}}}
    }


_USER = {
    "name": "X-User-ID",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "maxLength": MAX_USER_ID_CHARS},
}
# In a JSON body; the X-User-ID header wins when both are sent.
_BODY_USER = {"type": ["string", "null"], "maxLength": MAX_USER_ID_CHARS}
# A multipart image_hash: 64 hex, or empty for none.
_FORM_HASH = {
    "type": "string",
    "pattern": "^([0-9a-fA-F]{64})?$",
    "description": "SHA-256 of the image, 64 hex; empty: none. One that differs from the "
    "bytes' own (the original photo's, of a resized upload) becomes the client's alias "
    "of the entry (api.client_hash_mode)",
}
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"},
    "description": "Makes a retry safe: the first answer to this key (per client) is "
    "replayed byte for byte, with Idempotency-Replayed: true, for idempotency.ttl_s. "
    "The same key with a different request is 422; while the first is in flight, 409. "
    "A request is the same when it means the same: a new multipart boundary, another "
    "JSON key order or spacing do not make it different.",
}
_DEADLINE = {
    "name": "X-Deadline-Ms",
    "in": "header",
    "required": False,
    "schema": {"type": "integer", "minimum": 1},
    "description": "Ask for a shorter deadline than the server's default.",
}


def openapi_document(config: Config) -> dict[str, Any]:
    """The document for *config*: its limits, and bearer auth when API keys are set."""
    max_image = config.images.max_image_bytes
    keyed = bool(config.security.api_key_sha256)
    auth: tuple[int, ...] = (401,) if keyed else ()
    envelope = {
        "request_id": {"type": "string"},
        "timestamp": {"type": "string", "format": "date-time"},
    }
    check = {
        "type": "object",
        "properties": {
            "success": {"const": True},
            "cached": {"type": "boolean"},
            "data": _NULLABLE_DATA,
            "from_cache": {"type": "boolean"},
            **envelope,
        },
    }
    batch_check = {
        "type": "object",
        "properties": {
            "success": {"const": True},
            "total": {"type": "integer"},
            "cached_count": {"type": "integer"},
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "image_hash": _HASH,
                        "cached": {"type": "boolean"},
                        "data": _NULLABLE_DATA,
                    },
                },
            },
            **envelope,
        },
    }
    classify = {
        "type": "object",
        "properties": {
            "success": {"const": True},
            "data": {"$ref": "#/components/schemas/Data"},
            "from_cache": {"type": "boolean"},
            "processing_time_ms": {"type": "integer"},
            **envelope,
        },
    }
    batch = {
        "type": "object",
        "properties": {
            "success": {"const": True},
            "total": {"type": "integer"},
            "success_count": {"type": "integer"},
            "fail_count": {"type": "integer"},
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "index": {"type": "integer"},
                        "filename": {"type": "string"},
                        "success": {"type": "boolean"},
                        "data": _NULLABLE_DATA,
                        "error": {"type": ["string", "null"]},
                        "error_code": {"type": "string"},
                        "from_cache": {"type": "boolean"},
                        "processing_time_ms": {"type": "integer"},
                    },
                },
            },
            "total_processing_time_ms": {"type": "integer"},
            **envelope,
        },
    }
    health = {
        "type": "object",
        "required": ["status", "timestamp", "database", "model_api"],
        "properties": {
            "status": {"type": "string", "enum": ["healthy", "unhealthy"]},
            "timestamp": {"type": "string"},
            "database": {"type": "string", "enum": ["connected", "disconnected"]},
            "model_api": {"type": "string", "enum": ["available", "not_configured"]},
            "llm_providers": {
                "type": "object",
                "description": "Extension: each LLM provider's breaker state and last error.",
                "additionalProperties": {
                    "type": "object",
                    "required": ["state", "last_error", "last_error_at"],
                    "properties": {
                        "state": {"type": "string", "enum": ["closed", "open", "half_open"]},
                        "last_error": {
                            "type": ["string", "null"],
                            "enum": [*FAILURE_KINDS, None],
                        },
                        "last_error_at": {"type": ["string", "null"]},
                    },
                },
            },
        },
    }
    ready = {
        "type": "object",
        "required": ["ready", "degraded", "reasons", "checks"],
        "properties": {
            "ready": {"type": "boolean"},
            "degraded": {
                "type": "boolean",
                "description": "Serving, with something wrong: see reasons",
            },
            "reasons": {"type": "array", "items": {"type": "string"}},
            "checks": {"type": "object"},
        },
    }
    image_file = {"type": "string", "format": "binary", "maxLength": max_image}
    components: dict[str, Any] = {"schemas": {"Error": _ERROR, "Data": _DATA}}
    if keyed:
        components["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "An API key; the server holds only its SHA-256.",
            }
        }
    # With admin keys, /admin needs one: 401 without any valid key, 403 with another.
    admin_auth: tuple[int, ...] = (401, 403) if config.security.admin_key_sha256 else auth
    count = {"type": "integer", "minimum": 0}
    reclassified = {
        "type": "object",
        "required": ["success", "matched", "queued", "no_bytes", "dropped", "already_queued"],
        "properties": {
            "success": {"const": True},
            "matched": count,
            "queued": count,
            "no_bytes": count | {"description": "no spooled bytes on this replica"},
            "dropped": count | {"description": "the operators' queue was full"},
            "already_queued": count,
            **envelope,
        },
    }
    purged = {
        "type": "object",
        "required": ["success", "image_hash", "purged"],
        "properties": {
            "success": {"const": True},
            "image_hash": _HASH,
            "purged": {"type": "boolean", "description": "false: there was no such entry"},
            **envelope,
        },
    }
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Xintu",
            "version": "1",
            "description": "Photo classification for a photo album: eight categories, "
            "each photo classified once and cached by SHA-256.",
        },
        "paths": {
            "/api/v1/classify/check-cache": {
                "post": {
                    "summary": "Is this image hash (or the client's alias) already classified?",
                    "parameters": [_USER, _IDEMPOTENCY_KEY, _EVIDENCE],
                    "requestBody": _json_body(
                        {
                            "type": "object",
                            "required": ["image_hash"],
                            "properties": {"image_hash": _HASH, "user_id": _BODY_USER},
                        }
                    ),
                    "responses": _ok(check) | _errors(400, 408, 409, 413, 422, 429, 503, *auth),
                }
            },
            "/api/v1/classify/batch-check-cache": {
                "post": {
                    "summary": f"Check up to {MAX_CHECK_HASHES} image hashes at once",
                    "parameters": [_USER, _IDEMPOTENCY_KEY, _EVIDENCE],
                    "requestBody": _json_body(
                        {
                            "type": "object",
                            "required": ["image_hashes"],
                            "properties": {
                                "image_hashes": {
                                    "type": "array",
                                    "items": _HASH,
                                    "minItems": 1,
                                    "maxItems": MAX_CHECK_HASHES,
                                },
                                "user_id": _BODY_USER,
                            },
                        }
                    ),
                    "responses": _ok(batch_check)
                    | _errors(400, 408, 409, 413, 422, 429, 503, *auth),
                }
            },
            "/api/v1/classify": {
                "post": {
                    "summary": "Classify one image",
                    "parameters": [_USER, _DEADLINE, _IDEMPOTENCY_KEY],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["image"],
                                    "properties": {"image": image_file, "image_hash": _FORM_HASH},
                                }
                            }
                        },
                    },
                    "responses": _ok(classify)
                    | _errors(400, 408, 409, 413, 415, 422, 429, 503, 504, *auth),
                }
            },
            "/api/v1/classify/batch": {
                "post": {
                    "summary": f"Classify 1 to {MAX_BATCH_IMAGES} images concurrently",
                    "description": "Send `Accept: application/x-ndjson` to receive one JSON "
                    "line per item as it finishes, then one summary line.",
                    "parameters": [_USER, _DEADLINE, _IDEMPOTENCY_KEY],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["images"],
                                    "properties": {
                                        "images": {
                                            "type": "array",
                                            "items": image_file,
                                            "minItems": 1,
                                            "maxItems": MAX_BATCH_IMAGES,
                                        },
                                        "image_hashes": {
                                            "type": "string",
                                            "description": "JSON list of hashes or nulls, "
                                            "one per image",
                                        },
                                    },
                                }
                            }
                        },
                    },
                    "responses": _ok(batch)
                    | _errors(400, 408, 409, 413, 422, 429, 503, 504, *auth),
                }
            },
            "/api/v1/health": {
                "get": {
                    "summary": "The original backend's health check (status, database, model_api)",
                    "responses": _ok(health) | _errors(429, *auth),
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Alive (never needs a key, never rate-limited)",
                    "security": [],
                    "responses": _ok({"type": "object"}),
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Ready: model loaded, actors healthy, not draining (and the "
                    "store reachable with server.ready_without_store = false); degraded "
                    "with reasons",
                    "responses": _ok(ready)
                    | {
                        "503": {
                            "description": "Not ready; the body lists the checks",
                            "content": {"application/json": {"schema": ready}},
                        }
                    }
                    | _errors(*auth),
                }
            },
            "/admin/reclassify": {
                "post": {
                    "summary": "Re-classify entries with the LLM, by hash or by source and "
                    "date; the answer replaces the stored one (paced by "
                    "store.upgrades_per_minute; only photos whose bytes this replica spooled)",
                    "parameters": [_IDEMPOTENCY_KEY],
                    "requestBody": _json_body(
                        {
                            "oneOf": [
                                {
                                    "type": "object",
                                    "required": ["image_hashes"],
                                    "properties": {
                                        "image_hashes": {
                                            "type": "array",
                                            "items": _HASH,
                                            "minItems": 1,
                                            "maxItems": ADMIN_MAX_LISTED,
                                        }
                                    },
                                    "additionalProperties": False,
                                },
                                {
                                    "type": "object",
                                    "description": "entries made from since until before "
                                    "until, oldest first; at least one of source, since, "
                                    "until",
                                    "anyOf": [
                                        {"required": ["source"]},
                                        {"required": ["since"]},
                                        {"required": ["until"]},
                                    ],
                                    "properties": {
                                        "source": {"type": "string", "enum": ["local", "llm"]},
                                        "since": {"type": "string", "format": "date-time"},
                                        "until": {"type": "string", "format": "date-time"},
                                        "limit": {
                                            "type": "integer",
                                            "minimum": 1,
                                            "maximum": ADMIN_MAX_HASHES,
                                            "default": ADMIN_DEFAULT_LIMIT,
                                        },
                                    },
                                    "additionalProperties": False,
                                },
                            ]
                        }
                    ),
                    "responses": _ok(reclassified)
                    | _errors(400, 408, 409, 413, 422, 429, 503, *admin_auth),
                }
            },
            "/admin/purge": {
                "post": {
                    "summary": "Delete an entry: its row, its aliases, its in-flight claim "
                    "and its spooled bytes",
                    "parameters": [_IDEMPOTENCY_KEY],
                    "requestBody": _json_body(
                        {
                            "type": "object",
                            "required": ["image_hash"],
                            "properties": {"image_hash": _HASH},
                            "additionalProperties": False,
                        }
                    ),
                    "responses": _ok(purged)
                    | _errors(400, 408, 409, 413, 422, 429, 503, *admin_auth),
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": _ok({"type": "object"}) | _errors(429, *auth),
                }
            },
        },
        "components": components,
    }
    if keyed:
        doc["security"] = [{"bearer": []}]
    return doc
