"""The simulated world of one seed: a shared store, daemons, an API, receivers, and chaos.

Everything random is drawn from RNG streams derived from the seed, and everything runs on one
`VirtualLoop`, so a seed replays exactly. The run has an active phase (timers created, moved and
cancelled; store faults, latency, stalls, kills and restarts) and then a quiet phase (no faults,
every daemon alive, receivers answering 2xx) long enough for every timer to settle; the
invariants are checked along the way and at the end (`tests/sim/invariants.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import random
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import mongomock

from tests.sim.faults import FaultPlan, FaultyStore, StallFirst, StallRequest
from tests.sim.invariants import check_final
from tests.sim.loop import ACTOR, SkewedClock, TrueClock, VirtualLoop
from tests.sim.receivers import Ledger, Receivers
from tests.sim.trace import Trace
from timerd.clock import Clock
from timerd.daemon import Daemon
from timerd.delivery import Deliverer
from timerd.errors import TimerStateConflict
from timerd.models import State, Timer, TimerChanges
from timerd.retry import parse_schedule
from timerd.settings import Settings
from timerd.store.base import Store
from timerd.store.mongo import MongoStore
from timerd.store.sqlite import SqliteStore

T = TypeVar("T")

FINAL_STATES = frozenset({State.FIRED, State.FAILED, State.CANCELLED})
MAX_SKEW_MS = 30_000
STAMPS_WITH_DAEMON_CLOCK = "clock" in inspect.signature(Deliverer).parameters
STALL_TARGETS = (
    "claim_due",
    "complete",
    "release_claim",
    "recover_expired",
    "acquire_lease",
    "renew_leases",
    "server_time_ms",
    "pending_due",
    "*",
)
QUIET_HORIZON_MS = 30_000  # a pending timer due later than this after the run is a future attempt


@dataclass(frozen=True, slots=True)
class SimConfig:
    """What one run is: its seed and store, and the sizes the seed does not choose."""

    seed: int
    store: str = "sqlite"  # sqlite or mongo (mongomock)
    verbose: bool = False
    active_s: float = 25.0  # how long timers are created and faults injected
    quiet_max_s: float = 120.0  # longest quiet phase before the world must have settled
    early_tolerance_ms: int = 0  # how early a delivery may start before it counts as early
    ignore: tuple[str, ...] = ()  # violations containing one of these do not count (triage)

    @property
    def replay(self) -> str:
        return f"python -m tests.sim --seed {self.seed} --store {self.store} -v"


@dataclass(slots=True)
class Disruption:
    """A kill or a stall of one daemon, on the true clock (end None: never came back)."""

    actor: str
    kind: str
    start_ms: int
    end_ms: int | None


class DaemonActor:
    """One daemon process: its clock, its view of the store, its `Daemon` and run task."""

    def __init__(self, world: World, name: str, skew_ms: int) -> None:
        self.world = world
        self.name = name
        self.holder = f"{name}@host-{name}"
        self.rng = world.rng(f"actor/{name}")
        self.clock = SkewedClock(world.true, skew_ms, self.rng.uniform(1_000, 100_000))
        self.view = world.view(name)
        self.alive = True
        self.stalled_until_s = 0.0
        self.task: asyncio.Task[None] | None = None
        deliver = world.receivers.deliver_for(
            name, self._stamping_clock, self.gate, lambda: self.daemon.clock
        )
        kwargs: dict[str, Any] = {"clock": self.clock, "holder": self.holder}
        if "offload" in inspect.signature(Daemon).parameters:
            kwargs["offload"] = self.offload
        self.daemon = Daemon(world.settings, self.view, deliver, **kwargs)

    def _stamping_clock(self) -> Clock:
        """The clock attempts are stamped with, as production's `Deliverer` stamps them: the
        daemon's (store-corrected) clock once `Deliverer` takes one, else the host's own."""
        if STAMPS_WITH_DAEMON_CLOCK:
            return self.daemon.clock
        return self.clock

    def start(self) -> None:
        context = contextvars.copy_context()
        context.run(ACTOR.set, self.name)
        self.task = self.world.loop.create_task(self.daemon.run(), context=context)

    async def gate(self) -> None:
        """Wait while this process is stopped (a stall)."""
        loop = self.world.loop

        while loop.time() < self.stalled_until_s:  # noqa: ASYNC110
            await asyncio.sleep(self.stalled_until_s - loop.time())

    async def _stall(self, request: StallRequest) -> None:
        """Stop the whole process (every store call and delivery waits) for a while."""
        self.stalled_until_s = self.world.loop.time() + request.duration_s
        end_ms = self.world.true.now_ms() + int(request.duration_s * 1000) + 1
        self.world.disrupt(self, f"stall-{request.where}-{request.op}", end_ms)
        await self.gate()

    def _latency_s(self) -> float:
        if not self.world.plan.on:
            return 0.0
        r = self.rng.random()
        if r < 0.01:
            return self.rng.uniform(0.5, 2.0)  # a slow store for a moment
        if r < 0.12:
            return self.rng.uniform(0.0, 0.3)
        return 0.0

    async def offload(self, call: Callable[[], T]) -> T:
        """Run one store call inline, with the latency, stalls and freezes of this process."""
        await self.gate()
        if delay := self._latency_s():
            await asyncio.sleep(delay)
        while True:
            await self.gate()
            try:
                result = call()
            except StallFirst as stall:
                await self._stall(stall.args[0])
                continue
            except BaseException:
                await self._answered()
                raise
            await self._answered()
            self._note_claims(result)
            return result

    async def _answered(self) -> None:
        """The answer travels back (latency), to a process that may be stopped."""
        if (request := self.view.stall_after) is not None:
            self.view.stall_after = None
            await self._stall(request)
        if delay := self._latency_s():
            await asyncio.sleep(delay)
        await self.gate()

    def _note_claims(self, result: object) -> None:
        """When this process learnt of each claim it made (for the invariants)."""
        if not isinstance(result, list):
            return
        now_ms = self.world.true.now_ms()
        for timer in result:
            if isinstance(timer, Timer) and timer.claim_token and timer.state is State.FIRING:
                self.world.claims_seen[(timer.id, timer.attempts, self.name)] = now_ms


@dataclass(slots=True)
class ApiLog:
    """What the API acknowledged, and what its writes did even when unacknowledged."""

    acked: dict[str, Timer] = field(default_factory=dict)  # id -> as last acknowledged
    unknown: set[str] = field(default_factory=set)  # inserts that failed: may or may not exist
    cancel_acked: dict[str, int] = field(default_factory=dict)  # id -> true ms of the answer
    cancel_applied: dict[str, int] = field(default_factory=dict)  # id -> true ms it landed
    moves_applied: dict[str, list[int]] = field(default_factory=dict)  # id -> true ms of each


class ApiActor:
    """The API replicas: create, move and cancel timers through their own faulty view."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.rng = world.rng("api")
        self.log = ApiLog()
        self.view = world.view("api", observer=self._observe)
        self.hosts = [f"host{h}.sim" for h in range(self.rng.randint(2, 5))]
        self.rate_per_s = self.rng.uniform(0.5, 2.0)
        self._seq = 0

    def _observe(self, op: str, args: tuple[Any, ...], result: Any) -> None:
        if op == "cancel" and isinstance(result, Timer):
            self.log.cancel_applied.setdefault(result.id, self.world.true.now_ms())
        if op == "update_pending" and isinstance(result, Timer):
            self.log.moves_applied.setdefault(result.id, []).append(self.world.true.now_ms())

    async def run(self, until_s: float) -> None:
        loop = self.world.loop
        while True:
            await asyncio.sleep(self.rng.expovariate(self.rate_per_s))
            if loop.time() >= until_s:
                return
            r = self.rng.random()
            if r < 0.75 or not self.log.acked:
                self.create()
            elif r < 0.87:
                self.cancel()
            else:
                self.move()

    def _url(self) -> str:
        self._seq += 1
        return f"http://{self.rng.choice(self.hosts)}/hooks/{self._seq}"

    def create(self) -> None:
        now_ms = self.world.true.now_ms()
        timer = Timer(
            id=f"{self._seq + 1:06x}{self.rng.getrandbits(72):018x}",
            url=self._url(),
            due_at_ms=now_ms + self._delay_ms(),
            created_at_ms=now_ms,
            max_attempts=self.rng.choice((None, None, None, None, 1, 2, 3)),
        )
        try:
            stored = self.view.insert(timer)
        except Exception as exc:  # any failure is a 5xx the client sees
            self.world.trace(f"api insert {timer.id[-6:]} failed: {type(exc).__name__}")
            self.log.unknown.add(timer.id)
            return
        self.log.acked[stored.id] = stored
        self.world.trace(f"api insert {timer.id[-6:]} due +{timer.due_at_ms - now_ms} ms")
        self._announce(stored)

    def _delay_ms(self) -> int:
        """0-60 s ahead, mostly within 20 s (the run lasts as long as its last timer)."""
        return self.rng.randint(0, self.rng.choice((20_000, 20_000, 20_000, 60_000)))

    def _announce(self, timer: Timer) -> None:
        """The API shares a process with one daemon (`timerd run`) now and then."""
        alive = [a for a in self.world.actors if a.alive]
        if alive and self.rng.random() < 0.5:
            self.rng.choice(alive).daemon.notify_insert(timer)

    def _pick(self) -> str:
        return self.rng.choice(list(self.log.acked))

    def cancel(self) -> None:
        timer_id = self._pick()
        try:
            self.view.cancel(timer_id, self.world.true.now_ms())
        except TimerStateConflict:
            return
        except Exception as exc:  # a 5xx; it may have landed
            self.world.trace(f"api cancel {timer_id[-6:]} failed: {type(exc).__name__}")
            return
        self.log.cancel_acked[timer_id] = self.world.true.now_ms()
        self.world.trace(f"api cancel {timer_id[-6:]}")

    def move(self) -> None:
        timer_id = self._pick()
        now_ms = self.world.true.now_ms()
        url = self._url() if self.rng.random() < 0.3 else None
        changes = TimerChanges(due_at_ms=now_ms + self._delay_ms(), url=url)
        try:
            moved = self.view.update_pending(timer_id, changes)
        except TimerStateConflict:
            return
        except Exception as exc:  # a 5xx; it may have landed
            self.world.trace(f"api move {timer_id[-6:]} failed: {type(exc).__name__}")
            return
        self.log.acked[timer_id] = moved
        self.world.trace(f"api move {timer_id[-6:]} to +{moved.due_at_ms - now_ms} ms")


class World:
    """Everything one seed simulates."""

    def __init__(self, config: SimConfig, loop: VirtualLoop, workdir: Path) -> None:
        self.config = config
        self.loop = loop
        self.true = TrueClock(loop)
        self.trace = Trace(loop, verbose=config.verbose)
        shape = self.rng("shape")
        self.settings = self._settings(shape)
        self.plan = FaultPlan(
            p_before=shape.uniform(0.0, 0.08),
            p_after=shape.uniform(0.0, 0.05),
            p_duplicate=shape.uniform(0.0, 0.2),
        )
        self.inner = self._open_store(workdir)
        self.ledger = Ledger(self.true, config.early_tolerance_ms)
        self.receivers = Receivers(
            self.rng("receivers"),
            self.true,
            self.ledger,
            delivery_timeout_s=self.settings.delivery_timeout_s,
            trace=self.trace,
        )
        self.n_daemons = shape.choice((2, 3))
        self.actors: list[DaemonActor] = []
        self.disruptions: list[Disruption] = []
        self.violations: list[str] = []
        self.chaos = self.rng("chaos")
        self._restarts = 0
        self._views = 0
        self.api: ApiActor | None = None
        self._early_seen = 0
        self.quiet_since_ms: int | None = None
        self.claims_seen: dict[tuple[str, int, str], int] = {}  # (id, attempts, actor) -> ms

    # construction

    def rng(self, stream: str) -> random.Random:
        """An RNG of its own per stream, so one actor's draws never shift another's."""
        return random.Random(f"{self.config.seed}/{stream}")

    def _settings(self, shape: random.Random) -> Settings:
        return Settings(
            store="sqlite:///simulated",
            metrics_port=0,
            lease_ttl_s=6.0,
            lease_renew_s=2.0,
            poll_interval_s=shape.choice((1.0, 2.0)),
            lookahead_s=5.0,
            batch_size=shape.choice((4, 16, 64)),
            concurrency=shape.choice((4, 8, 32)),
            per_host_concurrency=shape.choice((1, 2, 4)),
            retry_schedule="1s,2s,5s",
            connect_timeout_s=1.0,
            delivery_timeout_s=3.0,
            drain_grace_s=2.0,
        )

    def _open_store(self, workdir: Path) -> Store:
        """The shared store, created with the seed's partition count (fixed at creation: the
        first process to open a database writes it, and every later one reads it)."""
        partitions = self.rng("shape/partitions").choice((1, 2, 3, 4, 8, 8, 64))
        store: Store
        if self.config.store == "mongo":
            client: Any = mongomock.MongoClient()
            client["sim"]["meta"].insert_one({"_id": "partitions", "value": partitions})
            store = MongoStore(client, "sim", server_time=self.true.now_ms)
        else:
            path = workdir / "sim.db"
            with contextlib.closing(sqlite3.connect(path)) as conn:
                conn.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
                conn.execute("INSERT INTO meta VALUES ('partitions', ?)", (partitions,))
                conn.commit()
            store = SqliteStore(str(path), synchronous="OFF")
        count = getattr(store, "partitions", lambda: 1)()
        self.trace(f"store {self.config.store}, {count} partitions")
        return store

    def view(self, name: str, observer: Any = None) -> FaultyStore:
        self._views += 1
        return FaultyStore(
            self.inner,
            name=name,
            kind=self.config.store,
            rng=self.rng(f"faults/{name}/{self._views}"),
            plan=self.plan,
            server_time_ms=self.true.now_ms,
            trace=self.trace,
            observer=observer,
        )

    def add_daemon(self, name: str) -> DaemonActor:
        skew_ms = self.rng(f"skew/{name}").randint(-MAX_SKEW_MS, MAX_SKEW_MS)
        actor = DaemonActor(self, name, skew_ms)
        self.actors.append(actor)
        self.trace(f"start {name} skew {skew_ms} ms")
        actor.start()
        return actor

    @property
    def budget(self) -> int:
        return len(parse_schedule(self.settings.retry_schedule)) + 1

    # faults

    def disrupt(self, actor: DaemonActor, kind: str, end_ms: int | None) -> None:
        now_ms = self.true.now_ms()
        self.disruptions.append(Disruption(actor.name, kind, now_ms, end_ms))
        self.trace(f"{kind} {actor.name} until {end_ms}")

    async def kill(self, actor: DaemonActor) -> None:
        """kill -9: its store view dies, every task of it is cancelled until none is left."""
        actor.alive = False
        actor.view.dead = True
        self.disrupt(actor, "kill", None)
        for _ in range(1000):
            tasks = self.loop.live_tasks(actor.name)
            if not tasks:
                break
            for task in tasks:
                task.cancel()
            await asyncio.sleep(0)
        else:
            self.violate(f"{actor.name} could not be killed: tasks keep running")
        if actor.task is not None and actor.task.done() and not actor.task.cancelled():
            actor.task.exception()  # retrieved: what a killed process raises is nobody's business

    def restart(self) -> DaemonActor:
        self._restarts += 1
        return self.add_daemon(f"r{self._restarts}")

    async def run_chaos(self, until_s: float) -> None:
        rng = self.chaos
        events = rng.choice((rng.randint(0, 3), rng.randint(0, 6), rng.randint(4, 12)))
        moments = sorted(rng.uniform(1.0, until_s) for _ in range(events))
        for moment in moments:
            await asyncio.sleep(max(0.0, moment - self.loop.time()))
            alive = [a for a in self.actors if a.alive]
            if not alive:
                continue
            victim = rng.choice(alive)
            if rng.random() < 0.6:
                self.arm_stall(victim)
                continue
            await self.kill(victim)
            if rng.random() < 0.7:
                self.loop.call_later(rng.uniform(0.5, 15.0), self._restart_if_active, until_s)

    def arm_stall(self, victim: DaemonActor) -> None:
        """Stop `victim` for 2-3 lease TTLs (now and then less) around one of its store calls."""
        rng = self.chaos
        ttls = rng.uniform(2.0, 3.0) if rng.random() < 0.7 else rng.uniform(0.3, 2.0)
        request = StallRequest(
            op=rng.choice(STALL_TARGETS),
            where=rng.choice(("before", "after")),
            duration_s=ttls * self.settings.lease_ttl_s,
        )
        victim.view.stall = request
        self.trace(f"arm stall {victim.name} {request}")

    def _restart_if_active(self, until_s: float) -> None:
        if self.loop.time() < until_s:
            self.restart()

    # invariants along the way

    def violate(self, what: str) -> None:
        if any(pattern in what for pattern in self.config.ignore):
            self.trace(f"violation (ignored) {what}")
            return
        self.trace(f"VIOLATION {what}")
        self.violations.append(what)

    async def monitor(self) -> None:
        """The cheap invariants, every half second of virtual time."""
        while True:
            await asyncio.sleep(0.5)
            self.check_step()

    def check_step(self) -> None:
        for actor in self.actors:
            if not actor.alive:
                continue
            task = actor.task
            if task is not None and task.done():
                actor.alive = False  # reported once; what follows from it is excused
                exc = None if task.cancelled() else task.exception()
                self.violate(f"{actor.name}: run() ended while it should run: {exc!r}")
                self.disrupt(actor, "crash", None)
            counters = actor.daemon.counters()
            if min(vars_of(counters).values()) < 0:
                self.violate(f"{actor.name}: negative counters {counters}")
            if counters.inflight > self.settings.concurrency:
                self.violate(f"{actor.name}: {counters.inflight} deliveries in flight")
        for line in self.ledger.early[self._early_seen :]:
            self.violate(f"delivered before due: {line}")
        self._early_seen = len(self.ledger.early)

    # the run

    async def main(self) -> None:
        monitor = self.loop.create_task(self.monitor())
        self.api = ApiActor(self)
        starts = self.rng("starts")
        for i in range(self.n_daemons):
            self.add_daemon(f"d{i}")
            await asyncio.sleep(starts.uniform(0.0, 2.0))
        active_s = self.config.active_s
        await asyncio.gather(self.api.run(active_s), self.run_chaos(active_s))
        await asyncio.sleep(max(0.0, active_s - self.loop.time()))
        await self.quiet()
        monitor.cancel()
        self.check_step()
        check_final(self)
        await self.stop_all()

    async def quiet(self) -> None:
        """Faults off, every daemon alive, receivers answering: wait until all settles."""
        self.trace("quiet phase")
        self.quiet_since_ms = self.true.now_ms()
        self.plan.on = False
        self.receivers.quiet = True
        for actor in self.actors:
            actor.view.stall = None
        while sum(a.alive for a in self.actors) < self.n_daemons:
            self.restart()
        deadline_s = self.loop.time() + self.config.quiet_max_s
        while self.loop.time() < deadline_s:
            await asyncio.sleep(1.0)
            if self.settled():
                self.trace("settled")
                return
        self.trace("did not settle")

    def settled(self) -> bool:
        """Nothing firing, nothing pending due soon, every live daemon idle (cheap queries)."""
        alive = [a for a in self.actors if a.alive]
        if any(a.stalled_until_s > self.loop.time() for a in alive):
            return False  # a stopped process settles nothing
        if not all(idle(a.daemon) for a in alive):
            return False
        next_due_ms = self.inner.next_due_at_ms()
        if next_due_ms is not None and next_due_ms <= self.true.now_ms() + QUIET_HORIZON_MS:
            return False
        return not self.inner.count_by_state().get(State.FIRING)

    def all_timers(self) -> list[Timer]:
        return self.inner.list_timers(None, None, 1_000_000)

    async def stop_all(self) -> None:
        """Stop every live daemon gracefully: run() must return cleanly, holding nothing."""
        alive = [a for a in self.actors if a.alive]
        for actor in alive:
            actor.daemon.stop()
        for actor in alive:
            assert actor.task is not None
            done, _ = await asyncio.wait([actor.task], timeout=self.settings.drain_grace_s * 3 + 5)
            if not done:
                self.violate(f"{actor.name}: run() did not return after stop()")
                continue
            if actor.task.cancelled() or actor.task.exception() is not None:
                exc = None if actor.task.cancelled() else actor.task.exception()
                self.violate(f"{actor.name}: run() did not return cleanly: {exc!r}")
            elif not idle(actor.daemon):
                self.violate(f"{actor.name}: holds {actor.daemon.counters()} after stopping")
            actor.alive = False
        self._check_leases_released({a.holder for a in alive})

    def _check_leases_released(self, holders: set[str]) -> None:
        """A clean stop hands every lease over at once: none is left live in a stopped name."""
        leases = getattr(self.inner, "leases", None)
        if leases is None:
            return
        now_ms = self.true.now_ms()
        for lease in leases():
            if lease.holder in holders and lease.expires_at_ms > now_ms:
                self.violate(f"lease {lease} still live after its holder stopped cleanly")

    def close(self) -> None:
        self.inner.close()


def vars_of(counters: object) -> dict[str, int]:
    names = getattr(counters, "__slots__", ()) or vars(counters)
    return {name: getattr(counters, name) for name in names}


def idle(daemon: Daemon) -> bool:
    return not any(vars_of(daemon.counters()).values())


def is_final(timer: Timer) -> bool:
    return timer.state in FINAL_STATES
