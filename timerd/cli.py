"""The `timerd` command: parse flags, configure logging, build settings, run.

timerd run      the API and the daemon in one process (the one-command start)
timerd api      the API alone (run any number of replicas on one store)
timerd daemon   the firing daemon alone (run two or more for high availability)
timerd status   what the store holds and who fires it
timerd bench    the benchmark: creates/s, fires/s and lateness over loopback (timerd.bench)
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager

import structlog
import uvicorn
import uvloop
from aiohttp import web
from starlette.applications import Starlette

from api import create_app  # the CLI is the one place that wires the API to the core
from api.auth import check_protected_mode
from timerd import __version__, garbage, keys, systemd
from timerd.bench import add_bench_arguments, run_bench
from timerd.clock import StoreClock, SystemClock
from timerd.daemon import Daemon
from timerd.delivery import Deliverer
from timerd.errors import ConfigError, DaemonCrashed, StoreUnavailable
from timerd.logs import configure_logging
from timerd.metrics import watch_store
from timerd.probes import start_probe_server
from timerd.settings import Settings, add_arguments, build_settings
from timerd.status import render, take_report
from timerd.store import Store, open_store
from timerd.workers import Workers, worker_count

log = structlog.get_logger("timerd")

DESCRIPTION = (
    "timerd keeps timers durably and, when one is due, sends its webhook: POST <url>/<id>."
    " `timerd run` starts the API (127.0.0.1:8081) and the firing daemon on ./timerd.db."
    " Every setting is a flag of its command or a TIMERD_* variable: timerd run --help."
)


class _Server(uvicorn.Server):
    """uvicorn's server without its own signal handling: the CLI owns SIGTERM and SIGINT so it
    can stop the daemon and the API together."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            systemd.notify("READY=1")

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        systemd.notify("STOPPING=1")
        await super().shutdown(sockets)


def _on_stop_signals(callback: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, callback)


def _server(settings: Settings, app: Starlette) -> _Server:
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # logging is configured once, by configure_logging
        access_log=False,
        lifespan="off",
        server_header=False,
        # h11's own bound on an incomplete head; httptools has none (api.limits holds for both)
        h11_max_incomplete_event_size=settings.max_request_head_bytes,
    )
    return _Server(config)


async def serve_api(settings: Settings) -> None:
    """`timerd api`: serve the API until SIGTERM or SIGINT."""
    store = _open_store(settings)
    check_protected_mode(settings, store)
    watch_store(store, SystemClock())
    try:
        server = _server(settings, create_app(settings, store))
        _on_stop_signals(lambda: setattr(server, "should_exit", True))
        log.info("api_starting", host=settings.host, port=settings.port, version=__version__)
        garbage.serving()
        await server.serve()
    finally:
        store.close()
    if not server.started:
        raise SystemExit(1)  # could not bind; uvicorn has said why


def _open_store(settings: Settings, *, for_daemon: bool = False) -> Store:
    return open_store(
        settings.store, for_daemon=for_daemon, allow_weak_writes=settings.allow_weak_writes
    )


async def run_daemon(settings: Settings) -> None:
    """`timerd daemon`: fire timers until SIGTERM or SIGINT, then drain and hand the partitions
    over; with more than one worker, as the parent of that many firing processes."""
    workers = worker_count(settings)
    if workers > 1:
        parent = Workers(settings, workers)
        _on_stop_signals(parent.stop)
        code = await parent.run()
        if code:
            raise DaemonCrashed(f"a worker exited on its own (exit code {code})")
        return
    store = _open_store(settings, for_daemon=True)
    watch_store(store, SystemClock())
    probes = None
    try:
        if settings.metrics_port:
            probes = await _start_probes(store, settings)
        async with _firing(settings, store) as daemon:
            _on_stop_signals(daemon.stop)
            garbage.serving()
            await daemon.run()
    finally:
        if probes is not None:
            await probes.cleanup()
        store.close()


@asynccontextmanager
async def _firing(settings: Settings, store: Store) -> AsyncIterator[Daemon]:
    """A daemon over `store` with its deliverer, both on one store-corrected clock (attempts
    are stamped with the clock due times are judged by)."""
    clock = StoreClock(SystemClock(), int(settings.max_clock_offset_s * 1000))
    async with Deliverer(settings, clock=clock) as deliverer:
        yield Daemon(
            settings,
            store,
            deliverer.deliver,
            clock=clock,
            deliver_callback=deliverer.deliver_callback,
        )


METRICS_PORTS_TRIED = 16  # daemons on one host take the next free port after the configured one


async def _start_probes(store: Store, settings: Settings) -> web.AppRunner:
    """Serve /metrics, /healthz and /readyz on `TIMERD_METRICS_PORT`, or, when another daemon
    on this host has it, on the next free port of the few after it (logged)."""
    error: OSError | None = None
    for port in range(settings.metrics_port, settings.metrics_port + METRICS_PORTS_TRIED):
        try:
            runner = await start_probe_server(store, settings.host, port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise ConfigError(f"TIMERD_METRICS_PORT: cannot listen on {port}: {exc}") from exc
            error = exc
            continue
        log.info("metrics_listening", host=settings.host, port=port)
        return runner
    where = f"{settings.host}:{settings.metrics_port}+{METRICS_PORTS_TRIED - 1}"
    raise ConfigError(f"TIMERD_METRICS_PORT: no free port in {where}: {error}")


async def run_all(settings: Settings) -> None:
    """`timerd run`: the API and the daemon in one process; a signal stops both."""
    api_store = _open_store(settings)
    daemon_store = _open_store(settings, for_daemon=True)
    check_protected_mode(settings, api_store)
    watch_store(api_store, SystemClock())
    try:
        async with _firing(settings, daemon_store) as daemon:
            server = _server(
                settings, create_app(settings, api_store, on_insert=daemon.notify_insert)
            )

            def stop() -> None:
                server.should_exit = True
                daemon.stop()

            _on_stop_signals(stop)
            log.info("api_starting", host=settings.host, port=settings.port, version=__version__)
            garbage.serving()
            daemon_task = asyncio.create_task(daemon.run())
            daemon_task.add_done_callback(lambda _: stop())  # a crashed daemon stops the API too
            await server.serve()
            daemon.stop()
            await daemon_task
    finally:
        api_store.close()
        daemon_store.close()
    if not server.started:
        raise SystemExit(1)


async def show_status(settings: Settings) -> None:
    """`timerd status`: print the store's daemons and their partitions, counts, backlog and
    recent lateness, judged by the store's clock."""
    store = _open_store(settings)
    try:
        now_ms = await asyncio.to_thread(store.server_time_ms) or SystemClock().now_ms()
        report = await asyncio.to_thread(take_report, store, settings.store, now_ms)
    finally:
        store.close()
    print(render(report, now_ms))


COMMANDS: dict[str, Callable[[Settings], Coroutine[None, None, None]]] = {
    "api": serve_api,
    "daemon": run_daemon,
    "run": run_all,
    "status": show_status,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timerd", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"timerd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "API and daemon in one process"),
        ("api", "the API alone"),
        ("daemon", "the firing daemon alone"),
        ("status", "live daemons, their partitions and rates, counts, backlog, lateness"),
    ):
        add_arguments(commands.add_parser(name, help=help_text))
    add_bench_arguments(commands.add_parser("bench", help="measure timerd on loopback"))
    _add_keys_parser(commands)
    return parser


def _add_keys_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys_parser = commands.add_parser("keys", help="create, list and revoke API keys")
    actions = keys_parser.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a key and print it, once")
    create.add_argument("--name", required=True, help="what the key is for")
    create.add_argument("--tenant", help="whose timers it sees (default: the name)")
    revoke = actions.add_parser("revoke", help="revoke a key at once, on every replica")
    revoke.add_argument("key_id", help="the id `timerd keys list` shows")
    for action in (create, actions.add_parser("list", help="every key, revoked ones too"), revoke):
        add_arguments(action)


def manage_keys(args: argparse.Namespace, settings: Settings) -> None:
    """`timerd keys create|list|revoke`."""
    store = _open_store(settings)
    now_ms = SystemClock().now_ms()
    try:
        if args.action == "create":
            token, key = keys.new_key(args.name, args.tenant or args.name, now_ms)
            store.add_key(key)
            print(token)
            print(
                f"key {key.key_id} for tenant {key.tenant!r}: keep it now, it is not shown again",
                file=sys.stderr,
            )
        elif args.action == "list":
            for key in store.list_keys():
                state = "live" if key.revoked_at_ms is None else "revoked"
                print(f"{key.key_id}  {state:<7}  tenant={key.tenant}  name={key.name}")
        elif not store.revoke_key(args.key_id, now_ms):
            raise ConfigError(f"no live key {args.key_id}")
    finally:
        store.close()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `timerd` console script."""
    args = _parser().parse_args(argv)
    if args.command == "bench":  # its own flags, not Settings: it starts timerd children
        run_bench(args)
        return
    try:
        settings = build_settings(args, os.environ)
        configure_logging(settings.log_level, settings.log_format)
        if args.command == "keys":
            manage_keys(args, settings)
        else:
            uvloop.run(COMMANDS[args.command](settings))
    except ConfigError as exc:
        print(f"timerd: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    except StoreUnavailable as exc:
        print(f"timerd: the store is unavailable: {exc}", file=sys.stderr)
        raise SystemExit(3) from exc
    except DaemonCrashed as exc:  # logged with its traceback already
        print(f"timerd: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
