"""``python -m bench [scenario ...] [--quick]``: run the scenarios, write the results.

Prints the parameters and machine facts first, then each scenario's outcome, then the
Markdown table; writes ``bench/results/<timestamp>/`` (``results.json``,
``results.md``, the PNG plots and every child's log). ``--publish`` also copies the
plots to ``bench/plots/`` for BENCHMARKS.md. Exit status 1 if a scenario failed
(a scenario's failed *checks* are results, reported in the table).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from ._context import Bench, Settings
from ._facts import machine_facts
from ._loadgen import GeneratorPool
from ._report import Outcome, render_markdown, write_json
from ._services import Stores
from .scenarios import SCENARIOS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PLOTS = ROOT / "bench" / "plots"


def _parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<11} {desc}" for name, (_, desc) in SCENARIOS.items())
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Xintu's benchmark harness (loopback only).",
        epilog=f"scenarios (default: all, in this order):\n{lines}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scenarios", nargs="*", metavar="scenario", help="scenarios to run")
    p.add_argument("--quick", action="store_true", help="short phases: a smoke run (~90 s)")
    p.add_argument("--store", choices=("sqlite", "mysql"), default="sqlite")
    p.add_argument(
        "--mysql-url",
        default="mysql://root@127.0.0.1:3306",
        help="server for --store mysql; the harness creates and drops xintu_bench_* databases",
    )
    p.add_argument("--processes", type=int, default=2, metavar="N", help="load generator processes")
    p.add_argument(
        "--workers", type=int, default=0, metavar="N", help="service workers (0: in-process)"
    )
    p.add_argument(
        "--connections", type=int, default=32, metavar="N", help="closed-loop connections"
    )
    p.add_argument(
        "--users",
        type=int,
        default=1000,
        metavar="N",
        help="simulated users (X-User-ID) the requests are spread over",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="XINTU_KEY=VALUE",
        help="a service setting for every service started (repeatable)",
    )
    p.add_argument("--out", type=Path, help="results folder (default bench/results/<timestamp>)")
    p.add_argument("--publish", action="store_true", help="copy the plots to bench/plots/")
    return p


def _settings(args: argparse.Namespace) -> Settings:
    env: dict[str, str] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("XINTU_"):
            raise SystemExit(f"--env wants XINTU_KEY=VALUE, got {item!r}")
        env[key] = value
    return Settings(
        quick=args.quick,
        store=args.store,
        mysql_url=args.mysql_url,
        generator_processes=args.processes,
        workers=args.workers,
        closed_connections=args.connections,
        users=args.users,
        env=env,
    )


def _service_config(settings: Settings) -> dict[str, Any] | str:
    try:
        from xintu import load_config

        return dict(load_config(env=dict(settings.env)).redacted())
    except Exception as exc:  # the config module is someone else's; report, don't die
        return f"unavailable: {exc}"


def _run_one(name: str, bench: Bench) -> Outcome:
    func, _ = SCENARIOS[name]
    load_before = [round(v, 2) for v in os.getloadavg()]
    started = time.monotonic()
    try:
        outcome = func(bench)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
        reason = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
        outcome = Outcome(name, status="failed", reason=f"{type(exc).__name__}: {reason}")
        outcome.details["traceback"] = traceback.format_exc()
        print(outcome.details["traceback"], file=sys.stderr)
    outcome.seconds = time.monotonic() - started
    outcome.details["load_avg_at_start"] = load_before
    return outcome


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scenarios; see the module docstring."""
    args = _parser().parse_args(argv)
    names = args.scenarios or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    settings = _settings(args)
    facts = machine_facts(ROOT)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    out_dir = args.out or RESULTS / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    run: dict[str, Any] = {
        "command": command.strip(),
        "scenarios_requested": names,
        "params": settings.as_dict(),
        "machine": facts,
        "service_config": _service_config(settings),
    }
    print(json.dumps({k: run[k] for k in ("command", "params", "machine")}, indent=1))
    print(f"results: {out_dir}", flush=True)

    outcomes: list[Outcome] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="xintu-bench-") as tmp:
        stores = Stores(settings.store, Path(tmp), settings.mysql_url)
        run["params"]["store"] = stores.describe()
        try:
            with GeneratorPool(settings.generator_processes) as gen:
                bench = Bench(settings, out_dir=out_dir, tmp=Path(tmp), gen=gen, stores=stores)
                run["services"] = bench.services
                for name in names:
                    print(f"\n== {name}", flush=True)
                    outcome = _run_one(name, bench)
                    outcomes.append(outcome)
                    print(f"== {name}: {outcome.status} {outcome.reason} ({outcome.seconds:.0f} s)")
        except KeyboardInterrupt:
            print("interrupted: writing what was measured", file=sys.stderr)
        finally:
            stores.cleanup()
    run["total_seconds"] = round(time.monotonic() - started, 1)
    run["load_avg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    run["scenarios"] = [o.as_dict() for o in outcomes]
    write_json(out_dir / "results.json", run)
    table = render_markdown(run, outcomes)
    (out_dir / "results.md").write_text(table)
    print("\n" + table)
    if args.publish:
        PLOTS.mkdir(parents=True, exist_ok=True)
        for o in outcomes:
            for plot in o.plots:
                shutil.copy2(out_dir / plot, PLOTS / plot)
    print(f"done in {run['total_seconds']:.0f} s; results in {out_dir}")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
