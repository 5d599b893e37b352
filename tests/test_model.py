"""The ONNX build of EfficientNet-Lite0: the .pth reader, the graph, the file on disk.

The graph is checked against an independent NumPy forward pass
(``tests/numpy_reference.py``) and against a real photo; the file handling against
truncation, garbage, stale manifests and concurrent builders.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import trio
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
from PIL import Image

import xintu.model
from xintu.errors import ModelError
from xintu.model import (
    INPUT_NAME,
    INPUT_SIZE,
    MODEL_NAME,
    OUTPUT_NAME,
    build_model,
    create_session,
    ensure_model,
    imagenet_labels,
    load_weights,
)
from xintu.model._artifact import manifest_path, verify_model
from xintu.model._pth import ForbiddenGlobal, read_legacy_pth

from . import numpy_reference

# --- a writer for the legacy .pth format, for synthetic and malicious files ----------


class _Name:
    """A global by name (torch's need not be importable here); pickles as GLOBAL."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: object) -> None:  # pragma: no cover - never called
        raise AssertionError("only pickled")


class _Call:
    """Pickles as ``func(*args)`` (REDUCE)."""

    def __init__(self, func: _Name, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


class _Storage:
    """Pickles as the persistent id torch gives a storage."""

    def __init__(self, kind: str, key: str, numel: int) -> None:
        self.pid = ("storage", _Name("torch", kind), key, "cpu", numel, None)


class _TorchLikePickler(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_name(self, obj: _Name) -> None:
        name = f"{obj.module}\n{obj.name}\n".encode()
        self.write(pickle.GLOBAL + name)  # type: ignore[attr-defined]

    dispatch[_Name] = _save_name  # type: ignore[assignment]

    def persistent_id(self, obj: Any) -> Any:
        return obj.pid if isinstance(obj, _Storage) else None


def _tensor(
    storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
) -> _Call:
    rebuild = _Name("torch._utils", "_rebuild_tensor_v2")
    return _Call(rebuild, storage, offset, size, stride, False, collections.OrderedDict())


def _legacy_pth(state: dict[str, object], storages: dict[str, np.ndarray]) -> bytes:
    """``torch.save(state, f, _use_new_zipfile_serialization=False)``, without torch."""
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"long": 8}}
    parts = [pickle.dumps(0x1950A86A20F9469CFC6C, 2), pickle.dumps(1001, 2)]
    parts.append(pickle.dumps(sys_info, 2))
    body = io.BytesIO()
    _TorchLikePickler(body, 2).dump(collections.OrderedDict(state))
    parts += [body.getvalue(), pickle.dumps(list(storages), 2)]
    for array in storages.values():
        parts += [
            array.size.to_bytes(8, "little"),
            array.astype(array.dtype.newbyteorder("<")).tobytes(),
        ]
    return b"".join(parts)


def _synthetic_pth() -> tuple[bytes, np.ndarray]:
    floats = np.arange(24, dtype=np.float32)
    state: dict[str, object] = {
        # A transposed view at an offset, as TF-converted conv weights are stored.
        "w": _tensor(_Storage("FloatStorage", "k0", 24), 2, (2, 3), (1, 2)),
        "n": _tensor(_Storage("LongStorage", "k1", 1), 0, (), ()),
    }
    return _legacy_pth(state, {"k0": floats, "k1": np.array([7], dtype=np.int64)}), floats


# --- the .pth reader -----------------------------------------------------------------


def test_reader_honours_offset_size_and_stride() -> None:
    data, _ = _synthetic_pth()
    tensors = read_legacy_pth(data)
    assert sorted(tensors) == ["n", "w"]
    np.testing.assert_array_equal(tensors["w"], [[2, 4, 6], [3, 5, 7]])
    assert tensors["w"].dtype == np.float32
    assert tensors["w"].flags.c_contiguous
    assert tensors["w"].flags.writeable
    assert tensors["n"].shape == ()
    assert tensors["n"].dtype == np.int64
    assert int(tensors["n"]) == 7


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("os", "system"),
        ("builtins", "eval"),
        ("torch", "load"),
        ("torch._utils", "_rebuild_parameter"),
    ],
)
def test_reader_refuses_other_globals(tmp_path: Path, module: str, name: str) -> None:
    marker = tmp_path / "pwned"
    evil = _legacy_pth({"x": _Call(_Name(module, name), f"touch {marker}")}, {})
    path = tmp_path / "evil.pth"
    path.write_bytes(evil)
    with pytest.raises(ModelError) as info:
        load_weights(path)
    assert str(info.value) == f"bad model weights {path}: global '{module}.{name}' is forbidden"
    assert isinstance(info.value.__cause__, ForbiddenGlobal)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("mangle", "problem"),
    [
        (lambda b: b[:-3], "truncated .pth file: storage k1 cut short"),
        (lambda b: b[:10], "not a legacy .pth file: unreadable header"),
        (lambda b: b + b"x", "malformed .pth file: 1 trailing bytes"),
        (
            lambda b: b"PK\x03\x04" + b,
            "a zip-format .pth file; only the legacy format is supported",
        ),
        (lambda b: pickle.dumps(42, 2) + b[15:], "not a legacy .pth file: bad magic number"),
    ],
)
def test_reader_refuses_malformed_files(
    tmp_path: Path, mangle: Callable[[bytes], bytes], problem: str
) -> None:
    path = tmp_path / "bad.pth"
    path.write_bytes(mangle(_synthetic_pth()[0]))
    with pytest.raises(ModelError) as info:
        load_weights(path)
    assert str(info.value) == f"bad model weights {path}: {problem}"


def test_packaged_weights_are_lite0() -> None:
    weights = load_weights()
    assert len(weights) == 296
    assert weights["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert weights["_blocks.15._depthwise_conv.weight"].shape == (1152, 1, 3, 3)
    assert weights["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert weights["_fc.weight"].shape == (1000, 1280)
    assert not any("_se_" in k for k in weights)  # Lite has no squeeze-excite
    assert all(v.dtype == np.float32 for k, v in weights.items() if "num_batches" not in k)


# --- the graph -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("built") / f"{MODEL_NAME}.onnx")


@pytest.fixture(scope="module")
def session(built: Path) -> Any:
    return create_session(built, intra_op_threads=2)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_public_api() -> None:
    assert sorted(xintu.model.__all__) == [
        "FACE_BOXES",
        "FACE_INPUT",
        "FACE_MODELS",
        "FACE_SCORES",
        "FaceModelSpec",
        "INPUT_NAME",
        "INPUT_SIZE",
        "MODEL_NAME",
        "OUTPUT_NAME",
        "build_model",
        "create_session",
        "ensure_model",
        "face_model_path",
        "imagenet_labels",
        "load_weights",
    ]
    assert (MODEL_NAME, INPUT_NAME, OUTPUT_NAME, INPUT_SIZE) == (
        "efficientnet-lite0",
        "input",
        "logits",
        224,
    )


def test_graph_shape(built: Path) -> None:
    model = onnx.load(built)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert (model.graph.input[0].name, dims) == (INPUT_NAME, ["N", 3, 224, 224])
    dims = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert (model.graph.output[0].name, dims) == (OUTPUT_NAME, ["N", 1000])
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops == {
        "Conv": 49,
        "Clip": 33,
        "Add": 9,
        "GlobalAveragePool": 1,
        "Flatten": 1,
        "Gemm": 1,
    }
    for node in model.graph.node:
        if node.op_type == "Conv":
            assert onnx.helper.get_node_attr_value(node, "auto_pad") == b"SAME_UPPER"


def test_build_is_deterministic(built: Path, tmp_path: Path) -> None:
    again = build_model(tmp_path / "again.onnx")
    assert _sha256(again) == _sha256(built)
    manifest = json.loads(manifest_path(built).read_text())
    assert manifest == json.loads(manifest_path(again).read_text())
    assert manifest["onnx_sha256"] == _sha256(built)
    assert manifest["onnx_size"] == built.stat().st_size


def test_matches_numpy_reference(session: Any) -> None:
    x = np.random.default_rng(20240607).uniform(-1, 1, (2, 3, 224, 224)).astype(np.float32)
    (logits,) = session.run(None, {INPUT_NAME: x})
    assert logits.shape == (2, 1000)
    expected = numpy_reference.forward(load_weights(), x)
    assert np.abs(logits - expected).max() <= 1e-4
    (single,) = session.run(None, {INPUT_NAME: x[1:]})  # the batch dimension is dynamic
    np.testing.assert_allclose(single[0], logits[1], atol=1e-5)


def _photo(pixels: np.ndarray) -> np.ndarray:
    """Shorter side to 256, centre crop 224, ``(x - 127) / 128``, as a batch of one."""
    img = Image.fromarray(pixels).convert("RGB")
    scale = 256 / min(img.size)
    img = img.resize(
        (round(img.width * scale), round(img.height * scale)), Image.Resampling.BILINEAR
    )
    left, top = (img.width - INPUT_SIZE) // 2, (img.height - INPUT_SIZE) // 2
    img = img.crop((left, top, left + INPUT_SIZE, top + INPUT_SIZE))
    return ((np.asarray(img, dtype=np.float32) - 127) / 128).transpose(2, 0, 1)[None]


def test_recognises_real_photos(session: Any) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    (logits,) = session.run(
        None,
        {
            INPUT_NAME: np.concatenate(
                [_photo(skimage_data.chelsea()), _photo(skimage_data.coffee())]
            )
        },
    )
    cat, coffee = np.argsort(logits, axis=1)[:, ::-1]
    # Chelsea is a tabby; ImageNet's tabby (281), tiger cat (282) and Egyptian cat (285)
    # are notoriously confusable, and this model ranks them 282, 285, 281.
    assert set(cat[:3]) == {281, 282, 285}
    assert imagenet_labels()[coffee[0]] == "espresso"


def test_imagenet_labels() -> None:
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert (labels[0], labels[281], labels[999]) == ("tench", "tabby cat", "toilet paper")
    assert imagenet_labels() is labels


# --- the file on disk ----------------------------------------------------------------


def _building(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("building ")]


@pytest.fixture(scope="module")
def built_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder as ensure_model leaves it: the face models and their wheel too."""
    return ensure_model(tmp_path_factory.mktemp("ensured")).parent


def _install(built: Path, data_dir: Path, built_dir: Path) -> Path:
    """Put the module's build where ensure_model looks, as if it had built it; the face
    models and the wheel come from *built_dir*, so only what a test breaks is rebuilt."""
    shutil.copytree(built_dir, data_dir / "models", ignore=shutil.ignore_patterns("*.lock"))
    target = data_dir / "models" / built.name
    shutil.copy(built, target)
    shutil.copy(manifest_path(built), manifest_path(target))
    return target


def _seed_wheel(built_dir: Path, data_dir: Path) -> None:
    """The face models' source wheel, as a previous build leaves it (no pip run)."""
    (data_dir / "models" / "wheels").mkdir(parents=True)
    for wheel in (built_dir / "wheels").iterdir():
        shutil.copy(wheel, data_dir / "models" / "wheels" / wheel.name)


def test_ensure_model_builds_once(
    data_dir: Path, built_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="xintu.model")
    _seed_wheel(built_dir, data_dir)
    path = ensure_model(data_dir)
    assert path == data_dir / "models" / "efficientnet-lite0.onnx"
    models = data_dir / "models"
    assert _building(caplog) == [
        f"building {path} (no model file)",
        f"building {models / 'blazeface-short-range.onnx'} (no model file)",
        f"building {models / 'blazeface-full-range.onnx'} (no model file)",
    ]
    inode = path.stat().st_ino
    assert ensure_model(data_dir) == path
    assert len(_building(caplog)) == 3
    assert path.stat().st_ino == inode


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garble(p: Path) -> None:
    p.write_bytes(np.random.default_rng(0).bytes(p.stat().st_size))


def _flip_one_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 1
    p.write_bytes(bytes(data))


def _drop_manifest(p: Path) -> None:
    manifest_path(p).unlink()


def _garble_manifest(p: Path) -> None:
    manifest_path(p).write_text("{not json")


def _stale_builder(p: Path) -> None:
    m = manifest_path(p)
    m.write_text(json.dumps(json.loads(m.read_text()) | {"builder_version": "0"}))


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (_truncate, "size differs from the manifest"),
        (_garble, "checksum differs from the manifest"),
        (_flip_one_byte, "checksum differs from the manifest"),
        (_drop_manifest, "no manifest"),
        (_garble_manifest, "unreadable manifest"),
        (_stale_builder, "built by another builder version"),
    ],
)
def test_ensure_model_rebuilds_a_bad_file(
    built: Path,
    built_dir: Path,
    data_dir: Path,
    caplog: pytest.LogCaptureFixture,
    corrupt: Callable[[Path], None],
    reason: str,
) -> None:
    caplog.set_level(logging.INFO, logger="xintu.model")
    path = _install(built, data_dir, built_dir)
    assert verify_model(path) is None
    corrupt(path)
    assert verify_model(path) == reason
    assert ensure_model(data_dir) == path
    assert _building(caplog) == [f"building {path} ({reason})"]
    assert _sha256(path) == _sha256(built)
    assert verify_model(path) is None


async def test_concurrent_ensure_model_builds_once(
    data_dir: Path, built_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="xintu.model")
    _seed_wheel(built_dir, data_dir)
    results: list[Path] = []

    async def call() -> None:
        results.append(await trio.to_thread.run_sync(ensure_model, data_dir))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(call)
    assert len(set(results)) == 1
    assert len(results) == 4
    assert len(_building(caplog)) == 3  # the classifier and two face models, once each
    assert verify_model(results[0]) is None


# --- sessions ------------------------------------------------------------------------


def test_create_session_translates_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.onnx"
    with pytest.raises(ModelError, match=f"^cannot load the model {missing}: ") as info:
        create_session(missing, intra_op_threads=1)
    assert isinstance(info.value.__cause__, ort_state.NoSuchFile)

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model" * 100)
    with pytest.raises(ModelError, match=f"^cannot load the model {garbage}: ") as info:
        create_session(garbage, intra_op_threads=1)
    assert isinstance(info.value.__cause__, ort_state.InvalidProtobuf)
