"""The MySQL store over TLS, against a private MariaDB that requires it.

Managed MySQL services require TLS, with the server verified against their CA.
Each test here starts its own ``mariadbd`` (:func:`.backends.private_mariadb`)
with certificates made for the test (:func:`.backends.make_certificates`) and
``require_secure_transport=ON``; the store connects with
``?ssl=true&ssl_ca=...``. The shared server (no TLS) shows the store refusing to
go on in clear text when the URL asks for TLS.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from xintu.errors import StoreError
from xintu.store import ResultWrite, WriteBatch
from xintu.store._mysql import MySQLStore, parse_mysql_url
from xintu.store._mysql import connect as mysql_connect

from .backends import make_certificates, mysql_execute, open_test_store, private_mariadb
from .test_store import clf, new_hash

pytestmark = pytest.mark.mysql

TEST_TIMEOUT_S = 60.0
DATABASE = "xintu_tls"


async def test_the_store_over_tls_verified_refused_in_clear(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        certs = await make_certificates(tmp_path / "certs")
        async with private_mariadb(
            tmp_path / "db",
            f"--ssl-ca={certs.ca}",
            f"--ssl-cert={certs.server_cert}",
            f"--ssl-key={certs.server_key}",
            "--require-secure-transport=ON",
        ) as server:
            verified = f"ssl=true&ssl_ca={certs.ca}&ssl_verify=true"
            await mysql_execute(server.url(query=verified), f"CREATE DATABASE {DATABASE}")
            url = server.url(DATABASE, query=verified)

            # Verified against the CA (and the host name, 127.0.0.1): the store works,
            # and its connections are encrypted.
            async with open_test_store(url, tmp_path / "data") as store:
                assert isinstance(store, MySQLStore)
                h = new_hash()
                assert await store.apply(WriteBatch("tls-1", results=(ResultWrite(h, clf(), 1),)))
                found = await store.get(h)
                assert found is not None
                assert found.classification == clf()
                async with store.pool.acquire() as conn:
                    ((name, cipher),) = await conn.fetchall("SHOW STATUS LIKE 'Ssl_cipher'")
                assert name == "Ssl_cipher"
                assert cipher != ""

            # Encrypted but unverified (ssl_verify=false): works too, no CA needed.
            async with open_test_store(
                server.url(DATABASE, query="ssl=true&ssl_verify=false"), tmp_path / "data"
            ) as store:
                assert await store.get(h) is not None

            # No TLS: the server refuses the session.
            with pytest.raises(StoreError) as clear:
                async with open_test_store(server.url(DATABASE), tmp_path / "data"):
                    pass
            assert "Access denied for user 'root'" in str(clear.value)

            # A CA that did not sign the server's certificate: a clear error.
            wrong = server.url(DATABASE, query=f"ssl=true&ssl_ca={certs.other_ca}")
            with pytest.raises(StoreError) as unverified:
                async with open_test_store(wrong, tmp_path / "data"):
                    pass
            assert str(unverified.value) == (
                f"mysql store mysql://root@127.0.0.1:{server.port}/{DATABASE}?ssl=true"
                f"&ssl_ca={certs.other_ca}: the server's TLS certificate was not accepted "
                "(self-signed certificate in certificate chain): is ssl_ca the CA that "
                "signed it, and does it name the host?"
            )

            # The right CA, but the URL names the server by a name its certificate lacks.
            renamed = url.replace("127.0.0.1", "localhost")
            with pytest.raises(StoreError, match="not accepted \\(Hostname mismatch"):
                async with open_test_store(renamed, tmp_path / "data"):
                    pass


async def test_tls_asked_of_a_server_without_it_sends_nothing(mysql_url: str) -> None:
    """The shared server offers no TLS: trio-mysql alone would log in in clear text."""
    settings = parse_mysql_url(mysql_url + "?ssl=true&ssl_verify=false")
    with trio.fail_after(TEST_TIMEOUT_S), pytest.raises(StoreError) as refused:
        await mysql_connect(settings, timeout_s=5.0)
    assert str(refused.value) == (
        f"mysql store {settings.url}: the server does not offer TLS, which the URL asks "
        "for; nothing was sent"
    )
