'''The LLM providers' wire formats, one module each, and the registry of their kinds.

::

    ProviderConfig.kind ──▶ wire_format(kind) ──▶ path · headers · body · answer_text
                              │
                              ├── openai.py     chat completions (OpenAI, DashScope/Qwen-VL,
                              │                 vLLM, Ollama, ...)
                              └── anthropic.py  Messages API

Every public module of this package is one wire format: it is named for its
``kind`` and defines ``FORMAT``, a :class:`WireFormat`. The registry is read from
the package itself, so the kinds that the configuration accepts
(``XINTU_LLM_<NAME>_KIND``, ``kind`` in ``[llm.provider.NAME]``) are exactly the
modules here: :data:`KINDS`, the default ``openai`` first, then the others by name.

Adding a kind is one new file plus its test. For Google's Gemini API, say,
``xintu/llm/wire/gemini.py``::

    """``kind = "gemini"``: Google's generateContent API."""

    from __future__ import annotations

    from typing import TYPE_CHECKING, Any, Final

    from .._parse import SYSTEM_PROMPT, user_prompt
    from ._base import WireFormat, joined_text, off_format

    if TYPE_CHECKING:  # the configuration imports this package
        from .._config import ProviderConfig, TokenLimitParam
        from .._image import UploadImage
        from .._parse import DescriptionLanguage


    class GeminiGenerate:
        kind: Final = "gemini"
        token_limit_params: Final[tuple[TokenLimitParam, ...]] = ("max_tokens",)
        max_temperature: Final = 2.0
        body_keys: Final = frozenset({"contents", "systemInstruction", "generationConfig"})

        def path(self, cfg: ProviderConfig) -> str:
            return f"/models/{cfg.model}:generateContent"

        def headers(self, cfg: ProviderConfig) -> dict[str, str]:
            return {"x-goog-api-key": cfg.api_key} if cfg.api_key else {}

        def body(
            self, cfg: ProviderConfig, image: UploadImage, *, language: DescriptionLanguage
        ) -> dict[str, Any]:
            generation: dict[str, Any] = {"maxOutputTokens": cfg.max_tokens}
            if cfg.temperature is not None:
                generation["temperature"] = cfg.temperature
            body: dict[str, Any] = {
                "systemInstruction": {"parts": [{"text": SYSTEM_PROMPT}]},
                "contents": [{"role": "user", "parts": [
                    {"text": user_prompt(language)},
                    {"inline_data": {"mime_type": "image/jpeg", "data": image.b64}},
                ]}],
                "generationConfig": generation,
            }
            return body | dict(cfg.extra_body)

        def answer_text(self, body: object) -> str:
            try:
                parts = body["candidates"][0]["content"]["parts"]  # type: ignore[index]
            except (TypeError, KeyError, IndexError):
                raise off_format() from None
            if not isinstance(parts, list):
                raise off_format()
            return joined_text(p.get("text") for p in parts if isinstance(p, dict))


    FORMAT: WireFormat = GeminiGenerate()

and ``tests/test_llm_wire_gemini.py`` pinning its request shape and answer
parsing (as ``tests/test_llm_parse.py`` does for these two). Nothing else changes:
the configuration then takes ``kind = "gemini"`` (with ``base_url`` and ``model``),
and :class:`~xintu.llm._providers.ProviderClient` sends that format's requests.
'''

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from types import MappingProxyType

from ._base import WireFormat as WireFormat

__all__ = ["DEFAULT_KIND", "FORMATS", "KINDS", "WireFormat", "wire_format"]

#: The kind of a provider whose configuration names none (and is not a known name).
DEFAULT_KIND = "openai"


def _discover() -> dict[str, WireFormat]:
    """Every public module of this package, as kind -> its ``FORMAT``."""
    found: dict[str, WireFormat] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        fmt = getattr(module, "FORMAT", None)
        if not isinstance(fmt, WireFormat) or fmt.kind != info.name:
            raise ImportError(
                f"{module.__name__} must define FORMAT, a WireFormat of kind {info.name!r}"
            )
        found[info.name] = fmt
    if DEFAULT_KIND not in found:
        raise ImportError(f"{__name__} has no {DEFAULT_KIND!r} wire format")
    return found


_FOUND = _discover()
#: Every kind the configuration accepts: the default first, then by name.
KINDS: tuple[str, ...] = (DEFAULT_KIND, *sorted(k for k in _FOUND if k != DEFAULT_KIND))
#: kind -> its wire format, in the order of :data:`KINDS`.
FORMATS: Mapping[str, WireFormat] = MappingProxyType({k: _FOUND[k] for k in KINDS})
del _FOUND


def wire_format(kind: str) -> WireFormat:
    """The wire format of *kind*, one of :data:`KINDS` (``KeyError`` otherwise)."""
    return FORMATS[kind]
