"""``kind = "anthropic"``: Anthropic's Messages API.

``POST {base_url}/v1/messages`` with ``x-api-key: KEY`` and ``anthropic-version:
2023-06-01``; the prompt's system part as ``system`` and the image as a base64
``image`` block. The token limit is always ``max_tokens``; ``temperature`` is 0..1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from .._parse import SYSTEM_PROMPT, user_prompt
from ._base import WireFormat, joined_text, off_format

if TYPE_CHECKING:
    from .._config import ProviderConfig, TokenLimitParam
    from .._image import UploadImage
    from .._parse import DescriptionLanguage

__all__ = ["ANTHROPIC_VERSION", "FORMAT", "AnthropicMessages"]

ANTHROPIC_VERSION = "2023-06-01"


class AnthropicMessages:
    """The Messages request and answer. Stateless; use :data:`FORMAT`."""

    kind: Final = "anthropic"
    token_limit_params: Final[tuple[TokenLimitParam, ...]] = ("max_tokens",)
    max_temperature: Final = 1.0
    body_keys: Final = frozenset({"model", "system", "messages", "temperature", "max_tokens"})

    def path(self, cfg: ProviderConfig) -> str:
        return "/v1/messages"

    def headers(self, cfg: ProviderConfig) -> dict[str, str]:
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if cfg.api_key:
            headers["x-api-key"] = cfg.api_key
        return headers

    def body(
        self, cfg: ProviderConfig, image: UploadImage, *, language: DescriptionLanguage
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": cfg.model, "max_tokens": cfg.max_tokens}
        if cfg.temperature is not None:
            body["temperature"] = cfg.temperature
        body["system"] = SYSTEM_PROMPT
        body["messages"] = [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/jpeg", "data": image.b64},
                    },
                    {"type": "text", "text": user_prompt(language)},
                ],
            }
        ]
        body.update(cfg.extra_body)
        return body

    def answer_text(self, body: object) -> str:
        if not isinstance(body, dict):
            raise off_format()
        blocks = body.get("content")
        if not isinstance(blocks, list):
            raise off_format()
        return joined_text(
            b.get("text") for b in blocks if isinstance(b, dict) and b.get("type") == "text"
        )


FORMAT: WireFormat = AnthropicMessages()
