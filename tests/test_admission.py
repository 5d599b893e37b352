"""Deadline-aware admission: work that cannot finish in time is refused at once."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
import trio
from quart import Response
from werkzeug.datastructures import FileStorage

from xintu import load_config
from xintu._rate import ServiceTime
from xintu.http import create_app

from .fakes import FakeDecoded, FakeModel
from .test_service import multipart


def test_service_time_estimates_the_queue() -> None:
    st = ServiceTime(weight=0.5)
    assert st.expected_wait_s(10, 2) == 0.0  # nothing measured yet: no refusal
    st.record(0.2)
    assert st.mean_s == pytest.approx(0.2)
    st.record(0.4)
    assert st.mean_s == pytest.approx(0.3)
    assert st.expected_wait_s(0, 2) == pytest.approx(0.3)  # its own service only
    assert st.expected_wait_s(4, 2) == pytest.approx(0.9)  # two rounds ahead, then its own
    # Cautious (long-tailed work): two mean deviations per round, summed like
    # independent errors: 2 * 0.1 * sqrt(3) for two rounds ahead and its own.
    assert st.deviation_s == pytest.approx(0.1)
    assert st.expected_wait_s(0, 2, cautious=True) == pytest.approx(0.3 + 2 * 0.1)
    assert st.expected_wait_s(4, 2, cautious=True) == pytest.approx(0.9 + 2 * 0.1 * 3**0.5)
    assert st.likely_within(0.31)
    assert not st.likely_within(0.29)


class SlowModel(FakeModel):
    """Decoding takes 100 ms of a worker thread, like a heavy photo."""

    def prepare(self, data: bytes) -> FakeDecoded:
        time.sleep(0.1)
        return super().prepare(data)


async def test_local_overload_is_refused_fast_not_timed_out(tmp_path: Path) -> None:
    config = load_config(
        env={},
        data={"dir": str(tmp_path)},
        server={"request_deadline_s": 0.35},
        model={"decode_threads": 1, "inference_threads": 1},
    )
    app = create_app(config, model_factory=lambda _c: SlowModel())
    statuses: list[int] = []
    codes: list[str] = []
    async with app.test_app():
        client = app.test_client()
        # One request first, so the pool has measured its service time.
        resp = await client.post(
            "/api/v1/classify", files={"image": FileStorage(io.BytesIO(b"warm"), filename="w")}
        )
        assert resp.status_code == 200

        async def one(i: int) -> None:
            r = await client.post(
                "/api/v1/classify",
                files={"image": FileStorage(io.BytesIO(f"p{i}".encode()), filename="p")},
            )
            statuses.append(r.status_code)
            if r.status_code != 200:
                codes.append((await r.get_json())["error_code"])

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for i in range(12):
                    nursery.start_soon(one, i)
        stats = app.runtime.statistics()
    # About three fit in 350 ms at 100 ms each on one thread; the rest are refused
    # up front with 503, and nothing waits in the queue until its deadline.
    assert 504 not in statuses, statuses
    assert statuses.count(200) >= 2
    assert statuses.count(503) >= 6
    assert set(codes) == {"overloaded"}
    assert stats.shed_for_deadline == statuses.count(503)


async def test_a_batch_under_overload_says_when_to_retry(tmp_path: Path) -> None:
    config = load_config(
        env={},
        data={"dir": str(tmp_path)},
        model={"decode_threads": 1, "inference_threads": 1},
    )
    app = create_app(config, model_factory=lambda _c: SlowModel())

    async def batch(prefix: str, count: int, deadline_ms: int) -> Response:
        body, headers = multipart(
            [("images", f"{i}.jpg", f"{prefix}{i}".encode()) for i in range(count)]
        )
        return await client.post(
            "/api/v1/classify/batch",
            data=body,
            headers=headers | {"X-Deadline-Ms": str(deadline_ms)},
        )

    async with app.test_app():
        client = app.test_client()
        resp = await client.post(
            "/api/v1/classify", files={"image": FileStorage(io.BytesIO(b"warm"), filename="w")}
        )
        assert resp.status_code == 200  # the pool has measured its service time
        with trio.fail_after(10):
            # Some items fit in 350 ms, the rest are refused: 200, with Retry-After.
            partial = await batch("a", 12, 350)
            # None fits in 50 ms: the batch as a whole is refused, as one photo would be.
            refused = await batch("b", 3, 50)
    body = await partial.get_json()
    assert partial.status_code == 200
    assert body["success_count"] >= 1
    assert {i["error_code"] for i in body["items"] if not i["success"]} == {"overloaded"}
    assert int(partial.headers["Retry-After"]) >= 1
    assert refused.status_code == 503
    assert (await refused.get_json())["error_code"] == "overloaded"
    assert int(refused.headers["Retry-After"]) >= 1
