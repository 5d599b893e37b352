"""Where the MySQL/MariaDB store is: its URL, parsed and checked once, as settings.

``mysql://user:pass@host:port/db[?ssl=true&ssl_ca=/path/ca.pem...]`` (``mariadb://``
too) becomes a frozen :class:`MySQLSettings`, its TLS options a
:class:`TlsSettings`; every error is a :class:`~xintu.errors.ConfigError` for
``store.url`` that never shows the password. Connecting is :mod:`._mysql_conn`'s.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from .._redact import redact_url
from ..errors import ConfigError

__all__ = ["URL_OPTIONS", "MySQLSettings", "TlsSettings", "parse_mysql_url"]

# The query options a store URL may carry (all about TLS), with what each takes.
URL_OPTIONS = {
    "ssl": "true or false: connect over TLS (implied by any other ssl_ option)",
    "ssl_ca": "a PEM file of the CA(s) to verify the server with (default: the system's)",
    "ssl_cert": "a PEM client certificate, for servers that require one",
    "ssl_key": "the client certificate's PEM key (if not in ssl_cert's file)",
    "ssl_verify": "true (default) or false: verify the server's certificate",
    "ssl_verify_identity": "true or false (default: ssl_verify): check the host name",
}
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """How to speak TLS to the server (from the URL's ``ssl*`` options).

    ``verify``: the server's certificate must chain to ``ca`` (or the system's
    CAs); ``verify_identity``: and name the host of the URL. Without ``verify``
    the session is encrypted but anyone in the path can impersonate the server.
    """

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    verify: bool = True
    verify_identity: bool = True

    def options(self) -> dict[str, str]:
        """The URL options that give these settings (defaults left out)."""
        out = {"ssl": "true"}
        for name, value in (("ssl_ca", self.ca), ("ssl_cert", self.cert), ("ssl_key", self.key)):
            if value is not None:
                out[name] = value
        if not self.verify:
            out["ssl_verify"] = "false"
        elif not self.verify_identity:
            out["ssl_verify_identity"] = "false"
        return out

    def context(self) -> ssl.SSLContext:
        """A client context (TLS 1.2+); :class:`ConfigError` for ``store.url`` if a
        file cannot be read. Reads the files: call it once, not per connection."""
        try:
            ctx = ssl.create_default_context(cafile=self.ca)
            if self.cert is not None:
                ctx.load_cert_chain(self.cert, keyfile=self.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("store.url", f"cannot use the TLS files of the URL: {exc}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = self.verify and self.verify_identity
        ctx.verify_mode = ssl.CERT_REQUIRED if self.verify else ssl.CERT_NONE
        return ctx


@dataclass(frozen=True, slots=True)
class MySQLSettings:
    """Where the server is; ``repr`` and :attr:`url` never show the password."""

    host: str
    port: int
    user: str | None
    password: str = field(repr=False)
    database: str
    tls: TlsSettings | None = None

    @property
    def url(self) -> str:
        """The URL with the password replaced by ``***``, for logs and messages."""
        creds = ""
        if self.user is not None:
            creds = self.user + (":***" if self.password else "") + "@"
        query = "" if self.tls is None else "?" + urlencode(self.tls.options(), safe="/")
        return f"mysql://{creds}{self.host}:{self.port}/{self.database}{query}"

    def with_database(self, database: str) -> MySQLSettings:
        return MySQLSettings(self.host, self.port, self.user, self.password, database, tls=self.tls)


def _flag(name: str, value: str, shown: str) -> bool:
    low = value.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError("store.url", f"option {name} must be true or false, got {value!r} in {shown}")


def _parse_tls(query: str, shown: str) -> TlsSettings | None:
    """The TLS settings of a URL's query (``None``: no TLS); every option checked."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ConfigError("store.url", f"malformed URL options in {shown}") from None
    options: dict[str, str] = {}
    for name, value in pairs:
        if name not in URL_OPTIONS:
            known = ", ".join(URL_OPTIONS)
            raise ConfigError(
                "store.url", f"unknown URL option {name!r} in {shown} (known: {known})"
            )
        if name in options:
            raise ConfigError("store.url", f"URL option {name} given twice in {shown}")
        options[name] = value
    for name in ("ssl_ca", "ssl_cert", "ssl_key"):
        if name in options and not options[name]:
            raise ConfigError("store.url", f"URL option {name} needs a file path in {shown}")
    others = sorted(n for n in options if n != "ssl")
    on = _flag("ssl", options["ssl"], shown) if "ssl" in options else bool(others)
    if not on:
        if others:
            raise ConfigError("store.url", f"ssl=false contradicts {', '.join(others)} in {shown}")
        return None
    verify = _flag("ssl_verify", options.get("ssl_verify", "true"), shown)
    identity = verify
    if "ssl_verify_identity" in options:
        identity = _flag("ssl_verify_identity", options["ssl_verify_identity"], shown)
    if identity and not verify:
        raise ConfigError("store.url", f"ssl_verify_identity=true needs ssl_verify=true in {shown}")
    if "ssl_key" in options and "ssl_cert" not in options:
        raise ConfigError("store.url", f"ssl_key needs ssl_cert in {shown}")
    return TlsSettings(
        ca=options.get("ssl_ca"),
        cert=options.get("ssl_cert"),
        key=options.get("ssl_key"),
        verify=verify,
        verify_identity=identity,
    )


def parse_mysql_url(url: str, *, require_database: bool = True) -> MySQLSettings:
    """``mysql://user:pass@host:port/db[?ssl=true&ssl_ca=/path/ca.pem...]`` as settings
    (``mariadb://`` too; the options are :data:`URL_OPTIONS`).

    User and password may be percent-encoded. Raises :class:`ConfigError` for
    ``store.url``, naming an unknown option; the message never contains the password.
    """
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port or 3306
    except ValueError as exc:
        raise ConfigError("store.url", f"not a valid MySQL URL: {shown} ({exc})") from None
    if parts.scheme.lower() not in ("mysql", "mariadb"):
        raise ConfigError("store.url", f"not a MySQL URL: {shown}")
    if parts.fragment:
        raise ConfigError("store.url", f"a URL fragment is not supported: {shown}")
    if not parts.hostname:
        raise ConfigError("store.url", f"no host in {shown}")
    database = unquote(parts.path.lstrip("/"))
    if "/" in database or "`" in database:
        raise ConfigError("store.url", f"bad database name in {shown}")
    if require_database and not database:
        raise ConfigError("store.url", f"no database in {shown} (mysql://user:pass@host:port/db)")
    return MySQLSettings(
        host=parts.hostname,
        port=port,
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else "",
        database=database,
        tls=_parse_tls(parts.query, shown) if parts.query else None,
    )
