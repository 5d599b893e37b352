"""The conformance suite's tools: Xintu driven only from outside, as other software does.

Nothing here imports :mod:`xintu`. The service runs as a separate process
(:mod:`.process`), the album page is plain browser JavaScript served from another
origin (:mod:`.origin`, ``album_client.html`` and ``album_client.js``), and the
browser is Debian's Chromium (:mod:`.browser`). The page implements the ORIGINAL
Xintu backend's client guide (``docs/客户端调用指南.md`` of
xiawenyong1977-netizen/ImageClassiferBackend), so the suite checks that an existing
client of the original works unchanged.

To run the suite against another checkout (e.g. an older commit, to see the tests
fail there)::

    git worktree add /tmp/old <commit>
    CONFORMANCE_XINTU_TREE=/tmp/old .venv/bin/pytest tests/test_conformance_*.py
"""

#: The eight album categories as the original's clients know them (its guide).
CATEGORIES = frozenset(
    {
        "social_activities",
        "pets",
        "single_person",
        "foods",
        "travel_scenery",
        "screenshot",
        "idcard",
        "other",
    }
)


def curl_or_skip() -> str:
    """The curl binary; a test without it skips, except under ``CI=true``, where it
    fails (``.ci/run`` runs on a machine that has curl)."""
    import os
    import shutil

    import pytest

    curl = shutil.which("curl")
    if curl is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI needs curl (apt-get install curl)")
        pytest.skip("no curl")
    return curl
