"""Tools for testing and benchmarking Xintu, not used by the service itself.

* :mod:`xintu.testing.fakellm`: a fake multimodal LLM upstream on loopback
  (OpenAI-compatible and Anthropic wire formats), in-process or as
  ``python -m xintu.testing.fakellm``.

Import the tool's module itself; nothing is imported here, so that importing
:mod:`xintu.testing` costs nothing.
"""

__all__: list[str] = []
