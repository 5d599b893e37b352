"""``kind = "openai"``: OpenAI-compatible chat completions.

Served by OpenAI itself and by every server that speaks its API: DashScope's
compatible mode (Qwen-VL), vLLM, Ollama, LM Studio, ... ``POST
{base_url}/chat/completions`` with ``Authorization: Bearer KEY`` (none without a
key, for a local server) and the image as a ``data:image/jpeg;base64,`` URL. The
token limit goes under ``max_tokens`` or, for OpenAI's o-series and gpt-5 models,
``max_completion_tokens``; ``temperature`` is 0..2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from .._parse import SYSTEM_PROMPT, user_prompt
from ._base import WireFormat, joined_text, off_format

if TYPE_CHECKING:
    from .._config import ProviderConfig, TokenLimitParam
    from .._image import UploadImage
    from .._parse import DescriptionLanguage

__all__ = ["FORMAT", "OpenAIChat"]


class OpenAIChat:
    """The chat completions request and answer. Stateless; use :data:`FORMAT`."""

    kind: Final = "openai"
    token_limit_params: Final[tuple[TokenLimitParam, ...]] = ("max_tokens", "max_completion_tokens")
    max_temperature: Final = 2.0
    body_keys: Final = frozenset(
        {"model", "messages", "temperature", "max_tokens", "max_completion_tokens"}
    )

    def path(self, cfg: ProviderConfig) -> str:
        return "/chat/completions"

    def headers(self, cfg: ProviderConfig) -> dict[str, str]:
        return {"authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}

    def body(
        self, cfg: ProviderConfig, image: UploadImage, *, language: DescriptionLanguage
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": cfg.model, cfg.token_limit_param: cfg.max_tokens}
        if cfg.temperature is not None:
            body["temperature"] = cfg.temperature
        body["messages"] = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": user_prompt(language)},
                    {
                        "type": "image_url",
                        "image_url": {"url": f"data:image/jpeg;base64,{image.b64}"},
                    },
                ],
            },
        ]
        body.update(cfg.extra_body)
        return body

    def answer_text(self, body: object) -> str:
        if not isinstance(body, dict):
            raise off_format()
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise off_format()
        message = choices[0].get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            return joined_text([content])
        if isinstance(content, list):  # some servers answer a list of content parts
            return joined_text(p.get("text") for p in content if isinstance(p, dict))
        raise off_format()


FORMAT: WireFormat = OpenAIChat()
