"""The one place that builds the local model from the configuration (``model.kind``).

Every user of the local model builds it here: the service (:mod:`xintu.http._app`,
in its own process with ``model.executor = "thread"``), each of the local pool's
worker processes (:mod:`xintu.actors._procs`, with ``"process"``), ``xintu classify
--local`` and ``xintu classify-local``. Another model replaces the default by
adding its kind to :data:`KINDS` (and to ``model.kind``'s choices in
:mod:`xintu._config`): a builder that takes the :class:`~xintu.Config` and returns
an object with the local pool's ``prepare``/``infer`` (:class:`xintu.actors.LocalModel`).

A builder makes sure its files are in the data directory (building them once,
under a file lock, when they are missing or stale) and opens them; it blocks for
seconds, so async code calls it from a worker thread. Being a module-level
function, a builder pickles by reference: the worker processes receive it and the
configuration, never a built model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._config import Config
from .._types import Classification
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..actors import LocalModel

__all__ = [
    "DEFAULT_KIND",
    "KINDS",
    "ModelKind",
    "StandaloneModel",
    "build_local_model",
    "ensure_local_model_files",
]

#: ``model.kind``'s default: EfficientNet-Lite0 with the BlazeFace and PP-OCRv4
#: detectors and the album rules (:class:`~xintu.vision.LocalClassifier`).
DEFAULT_KIND = "efficientnet-lite0"


@dataclass(frozen=True, slots=True)
class ModelKind:
    """How to get one kind of local model: its files, then the model itself."""

    #: Make sure its files are in ``config.data_dir`` (build them once if not).
    ensure_files: Callable[[Config], object]
    #: ``(config, description_language) -> model``; calls ``ensure_files`` itself.
    build: Callable[[Config, str], LocalModel[Any]]


def _efficientnet_lite0_files(config: Config) -> object:
    from ..model import ensure_model

    return ensure_model(config.data_dir)


def _efficientnet_lite0(config: Config, description_language: str) -> LocalModel[Any]:
    from ..model import ensure_model
    from ._classifier import LocalClassifier

    return LocalClassifier(
        config.model,
        config.images,
        ensure_model(config.data_dir),
        description_language=description_language,
    )


#: ``model.kind`` -> how to get it.
KINDS: dict[str, ModelKind] = {
    DEFAULT_KIND: ModelKind(_efficientnet_lite0_files, _efficientnet_lite0),
}


def _kind(config: Config) -> ModelKind:
    kind = config.model.kind
    found = KINDS.get(kind)
    if found is None:
        raise ConfigError("model.kind", f"must be one of {', '.join(KINDS)}; got {kind!r}")
    return found


def ensure_local_model_files(config: Config) -> None:
    """Make sure the files of ``config.model.kind`` are in the data directory, so
    that processes started next (the local pool's) only open them. Blocks (for
    minutes the first time: it may build them); raises like :func:`build_local_model`."""
    _kind(config).ensure_files(config)


def build_local_model(
    config: Config, *, description_language: str | None = None
) -> LocalModel[Any]:
    """The local model that ``config.model.kind`` names, built from *config*.

    *description_language* overrides ``llm.description_language`` (the language of
    the answers' ``description``). Raises :class:`~xintu.errors.ConfigError` for an
    unknown kind, :class:`~xintu.errors.ModelError` when the model cannot be built
    or opened.
    """
    return _kind(config).build(config, description_language or config.llm.description_language)


class StandaloneModel:
    """A built local model used on its own, one image at a time (the command line's)."""

    def __init__(self, model: LocalModel[Any]) -> None:
        self.model = model
        self.model_name = model.model_name

    def classify(self, data: bytes) -> Classification:
        """``prepare`` then ``infer`` on one image; raises the image's own error."""
        return self.model.infer([self.model.prepare(data)])[0]
