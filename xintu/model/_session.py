"""An onnxruntime CPU session for the built model, with errors translated."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from ..errors import ModelError

__all__ = ["create_session"]

# onnxruntime raises these (all plain Exception subclasses, no common base) as well as
# RuntimeError/ValueError from its Python layer.
_ORT_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    RuntimeError,
    ValueError,
    ort_state.EPFail,
    ort_state.EngineError,
    ort_state.Fail,
    ort_state.InvalidArgument,
    ort_state.InvalidGraph,
    ort_state.InvalidProtobuf,
    ort_state.ModelLoaded,
    ort_state.NoModel,
    ort_state.NoSuchFile,
    ort_state.NotImplemented,
    ort_state.RuntimeException,
)


def create_session(path: Path, *, intra_op_threads: int) -> ort.InferenceSession:
    """A CPU inference session on the model at *path*.

    *intra_op_threads* threads work inside one operator; operators run one at a time
    (sequential execution, one inter-op thread), with all graph optimisations on.
    Raises :class:`~xintu.errors.ModelError` if the file is missing or unloadable.
    """
    if intra_op_threads < 1:
        raise ValueError(f"intra_op_threads must be >= 1, got {intra_op_threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except _ORT_ERRORS as exc:
        raise ModelError(f"cannot load the model {path}: {exc}") from exc
