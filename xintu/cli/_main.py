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

    cfg = sub.add_parser("config", help="configuration")
    csub = _SubParsers(cfg.add_subparsers(dest="config_command", required=True))
    csub.add_parser("show", help="effective configuration, secrets redacted, with origins")
    return p


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
