"""Schemathesis against the service's own ``/openapi.json``, on a real Hypercorn server.

Every operation is fuzzed with schema-valid data (answers must match the documented
statuses, content types and schemas, and never be a 5xx) and with schema-violating
data (which must be refused with a 4xx). The server runs in this process on a free
port; Schemathesis drives it from a worker thread with ``requests``. Examples are
bounded so the whole run stays well under 30 seconds.

Three adjustments, to keep the checks honest rather than lenient:

- an arbitrary byte string is a schema-valid ``format: binary`` image but rarely an
  image, so on the upload endpoints "valid data is accepted" cannot hold (400/413/415
  are the right answers); every other check runs there;
- an empty list in an optional multipart field is sent as nothing at all, the same
  bytes as a valid request without it; such "invalid" cases are not checked;
- ``X-Deadline-Ms`` may be as low as 1, and a 1 ms deadline is honestly answered 504;
  positive cases get a deadline the fake model can meet. ``Idempotency-Key`` values are
  made unique per case, so that two unrelated generated requests never share one
  (that is the idempotency tests' subject).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import schemathesis
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import positive_data_acceptance
from schemathesis.core.failures import FailureGroup

from xintu import load_config

from .serving import DecodingModel, real_server

MAX_EXAMPLES = 25

# A refusal of schema-violating data: any 4xx the API documents (413: over a limit).
_REJECTIONS = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]


def _prepare(case: Case, mode: GenerationMode) -> None:
    headers = case.headers
    if headers is None:
        return
    if mode is GenerationMode.POSITIVE and "X-Deadline-Ms" in headers:
        headers["X-Deadline-Ms"] = "60000"
    if "Idempotency-Key" in headers:
        headers["Idempotency-Key"] = uuid.uuid4().hex


def _invisible_in_multipart(case: Case) -> bool:
    """An empty list in a multipart field is sent as no part at all: the very bytes of
    leaving the optional field out, which is valid. Schemathesis still counts it as
    invalid data, so such cases prove nothing either way."""
    body = case.body
    return (
        case.media_type == "multipart/form-data"
        and isinstance(body, dict)
        and any(v == [] for k, v in body.items() if k not in ("image", "images"))
    )


def _checker(op: APIOperation, mode: GenerationMode, base: str) -> Callable[[], None]:
    uploads = op.label in ("POST /api/v1/classify", "POST /api/v1/classify/batch")
    excluded = [positive_data_acceptance] if uploads else []

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def check(case: Case) -> None:
        if mode is GenerationMode.NEGATIVE and _invisible_in_multipart(case):
            return
        _prepare(case, mode)
        case.call_and_validate(base_url=base, excluded_checks=excluded, timeout=20)

    return check


def _fuzz(base: str) -> list[str]:
    config = schemathesis.Config.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": _REJECTIONS}}}
    )
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json", config=config)
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "POST /api/v1/classify",
        "POST /api/v1/classify/batch",
        "POST /api/v1/classify/check-cache",
        "POST /api/v1/classify/batch-check-cache",
        "GET /healthz",
        "GET /readyz",
    }
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _checker(op, mode, base)()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # nothing in it to make invalid
            except (FailureGroup, AssertionError) as exc:  # reported together below
                failures.append(f"{op.label} [{mode.value}]:\n{exc}")
    return failures


async def test_the_api_matches_its_openapi_document(tmp_path: Path) -> None:
    config = load_config(
        env={},
        data={"dir": str(tmp_path / "data")},
        store={"writer_flush_ms": 1},
        ratelimit={"rate_per_s": 0.0, "burst": 1, "max_clients": 1},
        log={"level": "warning"},
    )
    with trio.fail_after(60):
        async with real_server(config, DecodingModel(config.images)) as base:
            failures = await trio.to_thread.run_sync(_fuzz, base)
    assert not failures, "\n\n".join(failures)
