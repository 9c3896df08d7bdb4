"""Command line: ``logstack serve | check-config | wal inspect | stages list``."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from functools import partial

import trio
from pydantic import ValidationError

from . import __version__
from ._config import MAX_WORKERS, Settings, load_settings, read_config_file
from ._errors import ConfigError
from ._logging import configure_logging
from ._registry import describe_stages, resolve_pipeline


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        metavar="PATH",
        help="config file (default: $LOGSTACK_CONFIG, else built-in defaults)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="logstack", description=__doc__)
    parser.add_argument("--version", action="version", version=f"logstack {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    _add_config(serve)
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes, each with its own WAL shard (default: server.workers)",
    )
    # Set by the supervisor for its worker processes; not for people.
    serve.add_argument("--worker", help=argparse.SUPPRESS)
    serve.add_argument("--drain", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--port", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--ports-file", help=argparse.SUPPRESS)
    serve.add_argument("--peers", help=argparse.SUPPRESS)
    serve.add_argument("--supervisor", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--settings-stdin", action="store_true", help=argparse.SUPPRESS)
    check = sub.add_parser("check-config", help="validate a config file and the pipeline")
    check.add_argument("path", nargs="?", help="config file (or use --config)")
    _add_config(check)
    wal = sub.add_parser("wal", help="WAL tools")
    wal_sub = wal.add_subparsers(dest="wal_command", required=True)
    inspect = wal_sub.add_parser("inspect", help="print segments, records, checkpoints, damage")
    inspect.add_argument("directory", help="a WAL root or one key's directory")
    inspect.add_argument("--records", action="store_true", help="list every record")
    stages = sub.add_parser("stages", help="stage plugins")
    stages_sub = stages.add_subparsers(dest="stages_command", required=True)
    listing = stages_sub.add_parser(
        "list", help="installed stages: name, distribution, version, summary, options"
    )
    listing.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except BrokenPipeError:
        # The reader went away (``logstack wal inspect DIR --records | head``): stop
        # quietly, as ``cat`` does, not with a traceback. Python's own recipe: point stdout
        # at /dev/null so that the flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "check-config":
            if args.path and args.config and args.path != args.config:
                raise ConfigError(
                    [f"check-config: two files given ({args.config} and {args.path}); give one"]
                )
            return _check_config(config_path(args.path or args.config, os.environ))
        if args.command == "wal":
            from ._wal_inspect import inspect_wal

            return inspect_wal(args.directory, show_records=args.records, out=sys.stdout)
        if args.command == "stages":
            return _stages_list(as_json=args.json)
    except ConfigError as exc:
        print(f"logstack: {exc}", file=sys.stderr)
        return 2
    return 2  # pragma: no cover - argparse enforces a command


def _serve(args: argparse.Namespace) -> int:
    from ._service import serve
    from ._workers import WorkerRole, needs_supervisor, parse_worker, run_supervisor

    path = config_path(args.config, os.environ)
    settings = _settings_from_supervisor() if args.settings_stdin else _load_settings(path)
    if args.workers is not None:
        if not 1 <= args.workers <= MAX_WORKERS:
            raise ConfigError([f"--workers: must be between 1 and {MAX_WORKERS}"])
        server = settings.server.model_copy(update={"workers": args.workers})
        settings = settings.model_copy(update={"server": server})
    fields: dict[str, str] = {}
    if args.worker is not None:
        index, count = parse_worker(args.worker)
        fields["worker"] = f"{index}-drain" if args.drain else str(index)
    configure_logging(
        settings.server.log_level if not settings.server.debug else "DEBUG",
        settings.server.log_format,
        fields,
    )
    if args.worker is None and needs_supervisor(settings):
        return run_supervisor(settings, path)
    role = WorkerRole()
    if args.worker is not None:
        role = WorkerRole(
            index,
            count,
            drain=args.drain,
            port=args.port,
            ports_file=args.ports_file,
            peers_dir=args.peers,
            supervisor=args.supervisor,
        )
    _tune_runtime()
    try:
        trio.run(partial(serve, settings, config_path=path, role=role))
    except ConfigError:
        raise
    except Exception:
        # A bug (a stage that crashed, ...): said in one structured log line with its
        # traceback, like every other line, rather than printed raw on stderr.
        logging.getLogger("logstack").exception("stopped by an unexpected error")
        return 1
    return 0


def config_path(given: str | None, env: Mapping[str, str]) -> str | None:
    """The file the service runs from and reloads: ``--config``, else ``$LOGSTACK_CONFIG``
    (named, so that the admin status and the reload log say which file it is)."""
    return given or env.get("LOGSTACK_CONFIG") or None


def _settings_from_supervisor() -> Settings:
    """A worker's starting settings: what the supervisor runs, as JSON on stdin.

    Not the file: it may have changed or broken since the workers started (a SIGHUP the
    supervisor refused, a restart-only value it kept). Not a file either: they hold the
    tokens. The environment overrides apply again, as to a file (they are the same)."""
    text = sys.stdin.read()
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise ConfigError(["--settings-stdin: no settings from the supervisor on stdin"])
    return load_settings(data=document)


GIL_SWITCH_INTERVAL_S = 0.0005
"""How long a thread waiting for the GIL waits before the running one must hand it over
(Python's default: 5 ms). The WAL's ``fdatasync`` runs in a worker thread; once it returns,
that thread needs the GIL for a few microseconds to hand the result back to trio, while
the event loop's thread is busy with other requests most of the time under load. With the
default an ack waited up to 5 ms more per fsync: p99 ack at half load fell from 29.7 to
19.3 ms with 0.5 ms (median of five alternating pairs, docs/performance.md). Only the
worker threads (fsync, file work) ever wait for the GIL, so nothing else pays for it."""


def _tune_runtime() -> None:
    """The interpreter settings ``logstack serve`` runs with (see each constant/function)."""
    _tune_gc()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)


def _tune_gc() -> None:
    """Collect the young generation every 20,000 allocations instead of every 700.

    Every request decodes a few hundred dicts, lists and structs that die young; with the
    default threshold the collector runs several times per request and re-walks whatever is
    alive (measured: +7% lines/s on 100-line batches, see docs/performance.md). Objects
    alive after start-up (modules, settings, compiled rules) are frozen out of collections.
    Memory stays bounded: the threshold caps how much cyclic garbage waits, and most of
    ours is freed by reference counting anyway.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def _load_settings(path: str | None) -> Settings:
    """``load_settings``, and when it fails, the pipeline's problems with it: stage
    problems are found once the settings are valid, so a bad port once hid an unknown
    stage type until the port was fixed (one message is to list every problem)."""
    try:
        return load_settings(path)
    except ConfigError as exc:
        raise ConfigError([*exc.problems, *_pipeline_problems_alone(path)]) from None


def _pipeline_problems_alone(path: str | None) -> list[str]:
    """The problems of the file's ``pipeline:`` checked on its own (none if the file or the
    list cannot be read: ``load_settings`` has said why)."""
    path = config_path(path, os.environ)
    if path is None:
        return []
    try:
        pipeline = read_config_file(path).get("pipeline")
        if pipeline is None:
            return []
        settings = Settings.model_validate({"pipeline": pipeline})
    except (ConfigError, ValidationError):  # unreadable, or the list's shape is wrong:
        return []  # already reported
    try:
        resolve_pipeline(settings)
    except ConfigError as exc:
        return exc.problems
    return []


def _check_config(path: str | None) -> int:
    settings = _load_settings(path)
    stages = resolve_pipeline(settings)
    keys = settings.security.api_keys.values()
    active = sum(1 for k in keys if k.active)
    print(f"config OK: {path or '(defaults)'}")
    print(f"  api keys: {len(settings.security.api_keys)} ({active} active)")
    print(f"  pipeline: {' -> '.join(s.spec.instance_name for s in stages)}")
    print(f"  wal root: {settings.wal.root_path}")
    print(f"  workers: {settings.server.workers}")
    print(f"  loki: {', '.join(settings.loki.endpoints())} ({settings.loki.push_format})")
    for warning in settings.warnings():
        print(f"  warning: {warning}")
    return 0


def _stages_list(*, as_json: bool) -> int:
    rows = describe_stages()
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    widths = (18, 28, 9)
    print(f"{'NAME':<{widths[0]}} {'DISTRIBUTION':<{widths[1]}} {'VERSION':<{widths[2]}} SUMMARY")
    for row in rows:
        summary = f"ERROR: {row['error']}" if "error" in row else row.get("summary", "")
        print(
            f"{row['name']:<{widths[0]}} {row.get('distribution', '?'):<{widths[1]}} "
            f"{row.get('version', '?'):<{widths[2]}} {summary}"
        )
        for option, info in (row.get("options") or {}).items():
            print(f"    option {_option_line(option, info)}")
    return 1 if any("error" in row for row in rows) else 0


def _option_line(name: str, info: dict[str, object] | str) -> str:
    """``keep_last (int, default 4): Characters kept ...`` from ``describe_options``."""
    if not isinstance(info, dict):
        return f"{name}: {info}"
    default = "required" if info.get("required") else f"default {json.dumps(info.get('default'))}"
    return f"{name} ({info.get('type', '?')}, {default}): {info.get('description', '')}"
