"""The command line's arguments, and the dispatch to each command's module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._config import Config, load_config
from .._log import configure_logging
from ..errors import ConfigError, XintuError

__all__ = ["main"]


def _add_config(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """``--config`` on *parser*. Only the top level has a default: a subparser's
    default would overwrite a ``--config`` given before the command."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None if top else argparse.SUPPRESS,
        help="TOML file overriding defaults (or XINTU_CONFIG)",
    )


class _SubParsers:
    """``add_subparsers()``'s action, giving every parser it makes ``--config``."""

    def __init__(self, action: Any) -> None:
        self._action = action

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self._action.add_parser(name, **kwargs)
        _add_config(parser)
        return parser


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xintu", description="Photo classification for a photo album.")
    _add_config(p, top=True)
    sub = _SubParsers(p.add_subparsers(dest="command", required=True))

    s = sub.add_parser("serve", help="start the HTTP service")
    s.add_argument("--bind", metavar="HOST:PORT", help="listen address (server.bind)")
    s.add_argument("--workers", type=int, metavar="N", help="worker processes (server.workers)")

    m = sub.add_parser("model", help="the local ONNX model")
    msub = _SubParsers(m.add_subparsers(dest="model_command", required=True))
    b = msub.add_parser("build", help="build (or verify) the ONNX model in the data directory")
    b.add_argument("--force", action="store_true", help="rebuild even if a valid file exists")

    _add_classify(sub)

    c = sub.add_parser("classify-local", help="classify image files with the local model")
    c.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    c.add_argument("--json", action="store_true", help="one JSON object per line")

    _add_admin(sub)

    cfg = sub.add_parser("config", help="configuration")
    csub = _SubParsers(cfg.add_subparsers(dest="config_command", required=True))
    csub.add_parser("show", help="effective configuration, secrets redacted, with origins")
    return p


def _add_admin(sub: _SubParsers) -> None:
    a = sub.add_parser(
        "admin",
        help="operators' commands, sent to a running service",
        description=(
            "Operators' commands, sent over HTTP to a running Xintu service (its "
            "/admin endpoints). The admin key is read from XINTU_ADMIN_KEY."
        ),
    )
    asub = _SubParsers(a.add_subparsers(dest="admin_command", required=True))
    r = asub.add_parser(
        "reclassify",
        help="re-classify entries with the LLM, by hash or by source and date",
        description=(
            "Queue an LLM re-classification of entries, by hash or by source and date; "
            "the new answer replaces the stored one. Only photos whose bytes the service "
            "has spooled can be re-classified: the answer says how many had none."
        ),
    )
    r.add_argument("hashes", nargs="*", metavar="HASH", help="SHA-256 of the entries")
    r.add_argument("--source", choices=("local", "llm"), help="entries answered by this source")
    r.add_argument("--since", metavar="ISO", help="entries made at or after this time")
    r.add_argument("--until", metavar="ISO", help="entries made before this time")
    r.add_argument("--limit", type=int, metavar="N", help="most entries (default 1000)")
    r.add_argument("--server", metavar="URL", help="the service (default: http://server.bind)")
    p = asub.add_parser("purge", help="delete an entry: its row, its aliases and its spooled bytes")
    p.add_argument("image_hash", metavar="HASH")
    p.add_argument("--server", metavar="URL", help="the service (default: http://server.bind)")


def _admin(config: Config, args: argparse.Namespace) -> int:
    from ._admin import admin_purge, admin_reclassify

    if args.admin_command == "purge":
        return admin_purge(config, server=args.server, image_hash=args.image_hash)
    return admin_reclassify(
        config,
        server=args.server,
        hashes=args.hashes,
        source=args.source,
        since=args.since,
        until=args.until,
        limit=args.limit,
    )


def _add_classify(sub: _SubParsers) -> None:
    k = sub.add_parser(
        "classify",
        help="classify a folder of photos, report, and sort them into category folders",
        description=(
            "Classify photos (files or folders, walked for images) through a Xintu "
            "server, or with the local model when --server is not given. Results are "
            "journaled as they arrive, so an interrupted run continues where it stopped."
        ),
    )
    k.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="photos or folders")
    k.add_argument("--server", metavar="URL", help="Xintu service (default: classify locally)")
    k.add_argument("--api-key", metavar="KEY", help="sent as 'Authorization: Bearer KEY'")
    k.add_argument(
        "--output", type=Path, metavar="FILE", help="write results to FILE.json or FILE.csv"
    )
    k.add_argument("--sort-into", type=Path, metavar="DIR", help="sort photos into DIR/<category>/")
    k.add_argument(
        "--mode",
        choices=("copy", "move", "link"),
        help="how to sort: copy (default), move, or link (symlink)",
    )
    k.add_argument("--dry-run", action="store_true", help="print what would be done; write nothing")
    k.add_argument(
        "--concurrency", type=int, default=4, metavar="N", help="requests in flight (default 4)"
    )
    k.add_argument(
        "--state", type=Path, metavar="FILE", help="the resume journal (default: see docs)"
    )
    k.add_argument("--fresh", action="store_true", help="ignore earlier results; start over")


def _classify(config: Config, args: argparse.Namespace) -> int:
    from ._classify import Options, run

    problem = None
    if args.mode is not None and args.sort_into is None:
        problem = "--mode needs --sort-into"
    elif args.concurrency < 1:
        problem = "--concurrency must be at least 1"
    elif args.output is not None and args.output.suffix.lower() not in (".json", ".csv"):
        problem = "--output must end in .json or .csv"
    if problem is not None:
        print(f"xintu classify: {problem}", file=sys.stderr)
        return 2
    options = Options(
        paths=args.paths,
        server=args.server,
        api_key=args.api_key,
        output=args.output,
        sort_into=args.sort_into,
        mode=args.mode or "copy",
        dry_run=args.dry_run,
        concurrency=args.concurrency,
        state=args.state,
        fresh=args.fresh,
    )
    return run(config, options)


def _load(args: argparse.Namespace) -> Config:
    server: dict[str, Any] = {}
    if getattr(args, "bind", None):
        server["bind"] = args.bind
    if getattr(args, "workers", None) is not None:
        server["workers"] = args.workers
    config = load_config(args.config, **({"server": server} if server else {}))
    return config


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"xintu: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log)
    try:
        if args.command == "serve":
            from .._serve import serve

            return serve(config)
        if args.command == "model":
            from ._model import model_build

            return model_build(config, args.force)
        if args.command == "classify":
            return _classify(config, args)
        if args.command == "admin":
            return _admin(config, args)
        if args.command == "classify-local":
            from ._local import classify_local

            return classify_local(config, args.paths, args.json)
        if args.command == "config":
            from ._show import config_show

            return config_show(config)
    except XintuError as exc:
        print(f"xintu: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)  # pragma: no cover
