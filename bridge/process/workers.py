"""WORKERS=N: N bridge processes on one HTTP port, kept running by a supervisor.

Python runs one core per process, so one bridge process is one core whatever
the host has.  With ``WORKERS`` > 1, ``python main.py`` becomes this supervisor:

- The port is bound N times, before anything else (``listen``): N listening
  sockets with ``SO_REUSEPORT``, and the kernel spreads new connections over
  them.  When a worker dies its socket is closed, so the kernel sends new
  connections to the others until the restarted worker binds a fresh one.
- Each worker is forked with its own socket, and builds its own app with its
  own NATS connection: a complete bridge instance on the control plane, with
  its number (``Worker.index``) in every welcome frame.  The workers of one
  host find each other over Unix sockets in a private run directory
  (siblings.py: /metrics sums them, /readyz needs all of them).
- A worker that dies is logged and restarted with its number and socket
  (after 1 s, longer if it keeps dying young).  /readyz says 503 meanwhile.  A worker that fails before its
  first start is complete (NATS unreachable, a key unusable) stops them all:
  the supervisor exits with its code, as a lone process would.
- SIGTERM/SIGINT to the supervisor: every worker gets SIGTERM and shuts down
  as a lone process does (clients get 1001, NATS drained); exit 0 once all
  have.  Workers run in their own process group (a terminal's Ctrl-C reaches
  only the supervisor, which stops them once) and die with the supervisor
  even if it is killed (``PR_SET_PDEATHSIG``), so none is left holding the port.
- A supervisor that is killed leaves its run directory behind; the next one to
  start on the host removes such directories (``remove_stale_rundirs``), never
  one whose supervisor or workers still run.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from aiohttp import web

logger = logging.getLogger(__name__)

# fork: a worker starts at once with the supervisor's imports and settings; the
# supervisor has no threads and no event loop for it to inherit.
CTX = mp.get_context("fork")
STOP_TIMEOUT = 10.0  # seconds; a worker's own stop is bounded at a few
RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # seconds, for workers that keep dying young
STABLE_AFTER = 30.0  # seconds up after which a death restarts the backoff
PR_SET_PDEATHSIG = 1
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def listen(host: str, port: int, count: int = 1) -> list[socket.socket]:
    """Bind the HTTP port now, before NATS is reached, so a taken port fails at once.

    ``count`` > 1: that many sockets on the port with SO_REUSEPORT, one per worker.
    The port is first bound alone, so one another process holds (even with
    SO_REUSEPORT, like a second bridge) fails here instead of being shared.
    """
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    first = socket.create_server((host, port), family=family, backlog=128)
    if count == 1:
        return [first]
    port = first.getsockname()[1]  # the one the kernel chose, if port was 0
    first.close()
    return [socket.create_server((host, port), family=family, backlog=128, reuse_port=True)
            for _ in range(count)]


async def stop_once(web_app: web.Application) -> AsyncIterator[None]:
    """The first SIGINT/SIGTERM stops the bridge; later ones are noted, not obeyed.

    aiohttp raises GracefulExit on every signal, so a second one (Ctrl-C in a
    terminal reaches both `make run` and the bridge, which then passes it on)
    would cut the shutdown short and exit 1.  Once stopped, stop signals are
    held again: a late one must not turn the clean exit into a kill.
    """
    loop = asyncio.get_running_loop()
    stopping = False

    def on_signal() -> None:
        nonlocal stopping
        if stopping:
            logger.info("already stopping")
            return
        stopping = True
        raise web.GracefulExit()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    yield
    hold_stop_signals()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)


def hold_stop_signals() -> None:
    """Keep SIGTERM/SIGINT pending until ``release_stop_signals``.

    From the moment the port is bound a stop may come (an orchestrator, a test
    that saw the port open), but until aiohttp (or the supervisor) has its
    handlers in place the default action would kill the process mid-start.
    Held, the signal waits and then stops the process gracefully.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def release_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@dataclass(frozen=True)
class Worker:
    """Which worker this process is: ``index`` of ``count``; ``rundir`` holds their Unix sockets."""

    index: int = 1
    count: int = 1
    rundir: str = ""

    def socket_path(self, index: int) -> str:
        return os.path.join(self.rundir, f"w{index}.sock")

    @property
    def siblings(self) -> list[int]:
        return [i for i in range(1, self.count + 1) if i != self.index]


# A process that is the only one on its port.
LONE = Worker()

# serve(sock, worker, ready) runs one bridge process on ``sock`` until it is
# stopped and returns its exit code; it calls ``ready()`` once it serves.
Serve = Callable[[socket.socket, Worker, Callable[[], None]], int]


@dataclass
class _Slot:
    index: int
    process: mp.process.BaseProcess | None = None
    ready: Connection | None = None
    started: float = 0.0
    was_ready: bool = False
    failures: int = 0
    restart_at: float | None = None


def supervise(sockets: list[socket.socket], serve: Serve) -> int:
    """Run one worker per socket until SIGTERM/SIGINT; the exit code."""
    remove_stale_rundirs(tempfile.gettempdir())
    rundir = tempfile.mkdtemp(prefix=RUNDIR_PREFIX)
    try:
        with _claim(rundir):
            return _Supervisor(sockets, serve, rundir).run()
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


# -- run directories left by killed supervisors --------------------------------------
#
# A supervisor that is SIGKILLed (the OOM killer, `docker kill`, a node drain
# that runs out of patience) never reaches its ``finally``: its run directory
# stays in /tmp, one more for every such death, and in a container whose /tmp
# survives restarts they pile up.  The next supervisor removes them, and must
# never remove one still in use: a live supervisor's workers find each other
# through it, and without it /readyz turns 503 and /metrics counts one worker.
#
# Who is alive is told by a lock, not by a pid: each supervisor holds an
# exclusive flock on its directory's ``pid`` file for as long as it (or a worker
# it forked, which inherits the open file) runs, and the kernel drops the lock
# when the last of them dies, SIGKILL included.  A pid check would keep a dead
# supervisor's directory forever once its pid is reused, and would remove a
# live one's when /tmp is shared by containers with their own pid namespaces.
# The file also says the pid, for people.

RUNDIR_PREFIX = "bridge-workers-"
PID_FILE = "pid"


@contextlib.contextmanager
def _claim(rundir: str) -> Iterator[None]:
    """Hold the lock that says ``rundir`` is in use, until the supervisor is done with it.

    The file is locked before it gets its name: a supervisor starting at the same
    moment sees either no ``pid`` (and leaves the directory alone) or a locked one,
    never an unlocked one it could take for a dead supervisor's.
    """
    partial = os.path.join(rundir, PID_FILE + ".new")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.rename(partial, os.path.join(rundir, PID_FILE))
        yield
    finally:
        os.close(fd)


def remove_stale_rundirs(tmpdir: str) -> None:
    """Remove the run directories in ``tmpdir`` whose supervisor and workers are all gone.

    Only ours: named ``bridge-workers-*``, a real directory (a symlink is never
    followed: someone else's directory could be behind it), owned by this uid, and
    holding a ``pid`` file nobody has locked.  One without a ``pid`` file (a
    supervisor that is just starting, or one older than the lock) is left alone.
    Cleaning up never stops a start: a directory that cannot be checked is kept.
    """
    try:
        entries = [e.name for e in os.scandir(tmpdir) if e.name.startswith(RUNDIR_PREFIX)]
    except OSError as exc:
        logger.warning("cannot look for stale worker directories in %s: %s", tmpdir, exc)
        return
    for name in entries:
        try:
            _remove_if_stale(tmpdir, name)
        except OSError as exc:
            logger.warning("cannot check or remove %s: %s", os.path.join(tmpdir, name), exc)


def _remove_if_stale(tmpdir: str, name: str) -> None:
    top = os.open(tmpdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            # O_NOFOLLOW: a symlink fails here (ELOOP/ENOTDIR) instead of being followed.
            rundir = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=top)
        except (NotADirectoryError, FileNotFoundError):
            return  # not a directory, or gone already (another supervisor removed it)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return  # a symlink
            raise
        try:
            if os.fstat(rundir).st_uid != os.getuid():
                return  # another user's: not ours to judge
            try:
                pidfile = os.open(PID_FILE, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=rundir)
            except FileNotFoundError:
                return  # starting, or not one of ours: in doubt, keep it
            try:
                try:
                    fcntl.flock(pidfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return  # a live supervisor (or its workers) holds it
                pid = os.read(pidfile, 32).decode(errors="replace").strip()
                # Removed while we hold the lock: a supervisor cleaning up at the same
                # moment fails to lock it, or finds it gone.
                shutil.rmtree(name, dir_fd=top)
                logger.info("removed %s, left by supervisor %s that is gone", os.path.join(tmpdir, name), pid)
            finally:
                os.close(pidfile)
        finally:
            os.close(rundir)
    finally:
        os.close(top)


class _Supervisor:
    def __init__(self, sockets: list[socket.socket], serve: Serve, rundir: str) -> None:
        self.sockets: list[socket.socket | None] = list(sockets)
        # Where a restarted worker's fresh socket binds: the port every worker shares.
        self.family, self.address = sockets[0].family, sockets[0].getsockname()
        self.serve = serve
        self.rundir = rundir
        self.slots = [_Slot(i + 1) for i in range(len(sockets))]
        self.stopping = False
        self.pid = os.getpid()

    # -- the loop ------------------------------------------------------------------

    def run(self) -> int:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
        release_stop_signals()  # our handlers are in place (main held them until now)
        try:
            logger.info("starting %d workers on one port (SO_REUSEPORT)", len(self.slots))
            for slot in self.slots:
                self._start(slot)
            code = self._watch(wake_r)
            if code is None:
                code = self._stop_all()
            return code
        finally:
            # A stop signal from here on (a second SIGTERM while we finish) must not
            # turn a clean exit into death by signal: it waits, unhandled, until we exit.
            hold_stop_signals()
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            wake_r.close()
            wake_w.close()

    def _on_signal(self, signum: int, frame: object) -> None:
        # The wakeup fd ends the wait below; the flag says why.
        self.stopping = True

    def _watch(self, wake: socket.socket) -> int | None:
        """Until a signal: restart workers that die.  An exit code if the start fails."""
        while not self.stopping:
            now = time.monotonic()
            due = [s.restart_at for s in self.slots if s.restart_at is not None]
            timeout = max(0.0, min(due) - now) if due else None
            waitables: list[object] = [wake]
            for slot in self.slots:
                if slot.process is not None:
                    waitables.append(slot.process.sentinel)
                if slot.ready is not None:
                    waitables.append(slot.ready)
            for ready in wait(waitables, timeout):  # type: ignore[arg-type]
                if ready is wake:
                    with contextlib.suppress(BlockingIOError):
                        wake.recv(64)
            for slot in self.slots:
                self._read_ready(slot)
                if slot.process is not None and not slot.process.is_alive() and not self.stopping:
                    code = self._reaped(slot)
                    if code is not None:
                        return code
                if slot.restart_at is not None and slot.restart_at <= time.monotonic() and not self.stopping:
                    self._start(slot)
        return None

    def _read_ready(self, slot: _Slot) -> None:
        if slot.ready is None:
            return
        try:
            if not slot.ready.poll():
                return
            slot.ready.recv()
        except (EOFError, OSError):
            pass  # the worker died before it was ready: its sentinel says so
        else:
            slot.was_ready = True
            logger.info("worker %d ready (pid %s)", slot.index, slot.process.pid if slot.process else "?")
        slot.ready.close()
        slot.ready = None

    def _reaped(self, slot: _Slot) -> int | None:
        """A worker died on its own: restart it, or, before the first start is complete, give up."""
        assert slot.process is not None
        process, slot.process = slot.process, None
        process.join()
        code = process.exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else \
            f"exited with code {code}"
        if not slot.was_ready and not any(s.was_ready for s in self.slots):
            logger.error("worker %d %s before it could serve; stopping", slot.index, how)
            self._stop_all()
            return code if code and code > 0 else 1
        # Its socket goes with it: the kernel stops sending it connections nobody accepts.
        self._close_socket(slot.index)
        up = time.monotonic() - slot.started
        if up >= STABLE_AFTER:
            slot.failures = 0
        self._schedule_restart(slot, f"worker {slot.index} (pid {process.pid}) {how} after {up:.0f} s")
        slot.was_ready = False
        return None

    def _schedule_restart(self, slot: _Slot, what: str) -> None:
        delay = RESTART_DELAYS[min(slot.failures, len(RESTART_DELAYS) - 1)]
        slot.failures += 1
        logger.warning("%s; restarting it in %g s", what, delay)
        slot.restart_at = time.monotonic() + delay

    def _close_socket(self, index: int) -> None:
        sock = self.sockets[index - 1]
        if sock is not None:
            sock.close()
            self.sockets[index - 1] = None

    def _start(self, slot: _Slot) -> None:
        slot.restart_at = None
        if self.sockets[slot.index - 1] is None:
            try:
                self.sockets[slot.index - 1] = socket.create_server(
                    self.address, family=self.family, backlog=128, reuse_port=True)
            except OSError as exc:
                self._schedule_restart(slot, f"worker {slot.index}: cannot bind its socket again: {exc}")
                return
        if slot.ready is not None:
            slot.ready.close()
        reader, writer = CTX.Pipe(duplex=False)
        worker = Worker(slot.index, len(self.slots), self.rundir)
        process = CTX.Process(target=_worker_main, name=f"bridge-worker-{slot.index}",
                              args=(self.serve, self.sockets, worker, writer, self.pid))
        # Forked with stop signals held: the worker releases them once its own handlers are in place.
        hold_stop_signals()
        try:
            process.start()
        finally:
            release_stop_signals()
        writer.close()
        slot.process, slot.ready, slot.started = process, reader, time.monotonic()
        logger.info("worker %d started (pid %d)", slot.index, process.pid)

    # -- stopping --------------------------------------------------------------------

    def _stop_all(self) -> int:
        """SIGTERM every worker, wait for them (bounded), SIGKILL the stragglers; the exit code."""
        self.stopping = True
        running = [s.process for s in self.slots if s.process is not None and s.process.is_alive()]
        logger.info("stopping %d workers", len(running))
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)  # type: ignore[arg-type]
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in running:
            process.join(max(0.0, deadline - time.monotonic()))
        clean = True
        for process in running:
            if process.is_alive():
                logger.error("worker %s did not stop within %g s; killing it", process.name, STOP_TIMEOUT)
                process.kill()
                process.join()
            clean = clean and process.exitcode == 0
        for index in range(1, len(self.sockets) + 1):
            self._close_socket(index)
        return 0 if clean else 1


def _worker_main(serve: Serve, sockets: list[socket.socket | None], worker: Worker, ready: Connection,
                 supervisor: int) -> None:
    """A forked worker: leave the supervisor's signal plumbing behind, then serve."""
    signal.set_wakeup_fd(-1)  # inherited: our signals must not wake the supervisor's loop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor only; it stops us once
    _die_with(supervisor)
    mine = sockets[worker.index - 1]
    assert mine is not None
    for sock in sockets:
        if sock is not None and sock is not mine:
            sock.close()  # the other workers' sockets: not ours to accept on

    def notify() -> None:
        with contextlib.suppress(OSError):
            ready.send("ready")
            ready.close()

    raise SystemExit(serve(mine, worker, notify))


def _die_with(supervisor: int) -> None:
    """SIGTERM (our graceful stop) when the supervisor dies, even by SIGKILL: nobody else would stop us."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


# The aiohttp application's key to which worker this process is.
WORKER = web.AppKey("worker", Worker)
