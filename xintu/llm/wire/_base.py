"""What a wire format is: the protocol every module of :mod:`xintu.llm.wire` fills in.

A wire format turns one :class:`~xintu.llm.ProviderConfig` and one upload image
into one HTTP request (path, headers, JSON body), and a 200 answer's JSON back
into the model's text. It holds no state: one object serves every provider of its
kind. Everything else (the client, retries, deadlines, the breaker, reading the
text as an album category) is the same for every format and lives elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .._errors import BadAnswer

if TYPE_CHECKING:
    from .._config import ProviderConfig, TokenLimitParam
    from .._image import UploadImage
    from .._parse import DescriptionLanguage

__all__ = ["WireFormat", "joined_text", "off_format"]


@runtime_checkable
class WireFormat(Protocol):
    """One provider API's request and answer shapes, named by its ``kind``."""

    @property
    def kind(self) -> str:
        """The ``kind`` setting that selects this format; its module's name."""

    @property
    def token_limit_params(self) -> tuple[TokenLimitParam, ...]:
        """The values ``token_limit_param`` may take for this kind, the default first."""

    @property
    def max_temperature(self) -> float:
        """The highest ``temperature`` the API takes (the lowest is 0)."""

    @property
    def body_keys(self) -> frozenset[str]:
        """Top-level body fields the format sets itself: ``extra_body`` may not set them."""

    def path(self, cfg: ProviderConfig) -> str:
        """The endpoint path below ``cfg.base_url``."""

    def headers(self, cfg: ProviderConfig) -> dict[str, str]:
        """Authentication and version headers (set once on the provider's client)."""

    def body(
        self, cfg: ProviderConfig, image: UploadImage, *, language: DescriptionLanguage
    ) -> dict[str, Any]:
        """The JSON body asking *cfg*'s model to classify *image*, described in *language*.

        It carries ``cfg.max_tokens`` (under ``cfg.token_limit_param`` where the API
        has a choice), ``cfg.temperature`` unless None, and ``cfg.extra_body``
        merged last (the configuration keeps it off :attr:`body_keys`).
        """

    def answer_text(self, body: object) -> str:
        """The model's text from a 200 response's JSON; :class:`BadAnswer` if off-format."""


def off_format() -> BadAnswer:
    """The error for a 200 answer that is not in the provider's format."""
    return BadAnswer("the response is not in the provider's format")


def joined_text(parts: Iterable[object]) -> str:
    """The string parts of an answer, one per line; :class:`BadAnswer` if none."""
    texts = [p for p in parts if isinstance(p, str)]
    if not texts:
        raise BadAnswer("the response holds no text")
    return "\n".join(texts)
