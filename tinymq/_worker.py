"""``python -m tinymq worker package.module:queue``: worker processes for a queue shared through a broker.

The supervisor (the process the user starts) runs ``--processes`` children,
each ``python -m tinymq _worker-child``: a fresh interpreter (never a fork of
a process holding connections or threads) that imports the user's module,
takes the Queue and calls ``start_dispatcher(workers)``.

- SIGTERM or SIGINT to the supervisor is forwarded to every child (as SIGTERM),
  and each child stops gracefully with ``queue.stop(wait=True)``: running
  attempts finish, buffered jobs go back to the broker. A child ignores further
  signals while it stops. A second signal to the supervisor while stopping is a
  hard stop: it kills the children and their process groups (their leased
  attempts go back when the leases run out). A stop signal while the target is still being loaded (its
  check, before any child starts) kills that check, however long its import
  would take, and the supervisor exits with 0. A child still loading the target
  when the signal comes exits at once: nothing of the queue runs in it yet (one
  whose module ignored SIGTERM at import, as it loaded, is sent it again once it
  says it has loaded the target).
  Once it has loaded the target, a child installs its SIGTERM/SIGINT handlers
  again, replacing what the module set at import (SIG_IGN, SIG_DFL: a hang, or
  attempts killed midway); a child killed by SIGTERM after that did not stop
  gracefully, and the supervisor exits 1.
- A child that exits without being asked to (a crash, a signal, the OOM killer)
  is started again after a delay that doubles, up to a few seconds, while it
  keeps crashing soon after its start. A child that could not load the target
  (exit code 3) is not: unless it had told the supervisor, through a pipe of
  its own, that it loaded the target (then code 3 is a crash, say a job's
  ``os._exit(3)``). Nor is one that exits 0 without having said so, or that it
  stops for a signal while loading: its import ended it, as the check refuses.
- Children run in a session of their own, so a Ctrl-C in the terminal reaches
  the supervisor only (which forwards it once), and each child reads a pipe from
  the supervisor: when the supervisor dies, the pipe closes and the child stops
  (gracefully; one still loading the target, and the check, exit at once).

The only things asked of the queue beyond the public Queue API are a broker
(``queue.broker is not None``): without one, worker processes would not share it;
and that its module did not start or stop it at import (each child starts it).
"""
import atexit
import importlib
import logging
import math
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import IO, Any, List, NoReturn, Optional, Sequence, Set, TextIO, Tuple, Union

from ._cli import CommandError
from .errors import counted
from .queue import Queue

__all__ = ["default_workers", "split_target", "load_queue", "run_child", "Supervisor"]

logger = logging.getLogger("tinymq.worker")

EXIT_BAD_TARGET = 3  # a child could not load the target: starting it again would not help
EXIT_SUPERVISOR_GONE = 4  # the supervisor died while a child was still loading the target
# What a child writes to its --loaded-fd pipe, once: it loaded the target, or a stop signal came
# while it loaded it (it exits 0). A child that exits 0 having written neither was ended by the import.
_SAID_LOADED = b"1"
_SAID_STOPPED_LOADING = b"0"
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Written on stderr by the check just before its error message, its last output: what came before is
# the output of the import (the module's logs and warnings), passed on as such, not part of the error.
_ERROR_FOLLOWS = "\x1e"  # (ASCII record separator)
# Written on stderr by a fork that the check's import made, instead of anything else: the check's
# own process says what went wrong, once (a fork and its parent would each say it).
_FORKED = "\x1d"  # (ASCII group separator)
_FIRST_RESTART_DELAY = 0.5  # seconds before restarting a crashed child
_MAX_RESTART_DELAY = 5.0  # the cap of the doubling delay of a child that keeps crashing
_STABLE_AFTER = 30.0  # seconds a child must run for a crash to restart it after the first delay again
_READ_SIZE = 512
_CHECK_READ_SIZE = 65536  # bytes read at a time of what the check's import prints
_CHECK_FORK_WAIT = 2.0  # seconds the check's pipes are read after it exited (a fork the import made may hold them)
_REPR_WIDTH = 80  # characters of an unexpected object shown in an error


def default_workers() -> int:
    """``--workers`` when not given: the number of CPUs, or 4 when it cannot be told."""
    return os.cpu_count() or 4


def split_target(target: str) -> Tuple[str, str]:
    """``"package.module:attribute.path"`` as (module name, attribute path); ValueError otherwise."""
    module_name, colon, attribute_path = target.partition(":")
    parts = module_name.split(".") + attribute_path.split(".")
    if not colon or not all(part.isidentifier() for part in parts):
        raise ValueError(f"the target must look like 'package.module:queue', got {target!r}{_as_module(target)}")
    return module_name, attribute_path


def _as_module(target: str) -> str:
    """A hint for a target given as a file path (``myapp/jobs.py:queue``) or without ``:queue``."""
    path, colon, attribute_path = target.partition(":")
    dotted = path[:-len(".py")] if path.endswith(".py") else path
    if os.path.isabs(dotted):  # a module name is relative to the current directory, where it is imported from
        dotted = os.path.relpath(dotted)
        if dotted == os.pardir or dotted.startswith(os.pardir + os.sep):
            return ""  # (outside it: no module name would find the file from here)
    dotted = dotted.replace(os.sep, "/")
    while dotted.startswith("./"):
        dotted = dotted[len("./"):]
    dotted = dotted.strip("/").replace("/", ".")
    if not all(part.isidentifier() for part in dotted.split(".")):
        return ""
    if colon:
        if dotted == path or not all(part.isidentifier() for part in attribute_path.split(".")):
            return ""
        return f"; write {dotted + ':' + attribute_path!r} (a module name, as for `python -m`, not a file path)"
    return f"; write {dotted + ':queue'!r}, with the name of the Queue in that module after the colon"


def _import_error(module_name: str, target: str, exc: BaseException) -> CommandError:
    """A CommandError for a failed import: one line when the module is missing, else its traceback."""
    if isinstance(exc, ModuleNotFoundError) and exc.name and (
            module_name == exc.name or module_name.startswith(exc.name + ".")):
        hint = ""
        if module_name.endswith(".py") and exc.name == module_name:
            hint = f"; write {module_name[:-len('.py')]!r} (a module name, without .py)"
        return CommandError(f"cannot import {module_name!r} (from {target!r}): no module named {exc.name!r} "
                            f"(looked in the current directory {os.getcwd()!r} and sys.path){hint}")
    return _raised(f"importing {module_name!r} (from {target!r})", exc)


def _raised(what: str, exc: BaseException) -> CommandError:
    """A CommandError for the user's code that raised while ``what``: its own frames say where;
    importlib's and tinymq's frames say nothing."""
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__)
              if frame.filename not in (__file__, importlib.__file__)
              and not frame.filename.startswith("<frozen importlib")]
    text = "".join(traceback.format_list(frames) + traceback.format_exception_only(type(exc), exc))
    return CommandError(f"{what} raised an exception:\nTraceback (most recent call last):\n{text.rstrip()}")


def load_queue(target: str) -> Queue:
    """Import ``package.module:attribute.path`` and return that Queue; CommandError when it is not one."""
    try:
        module_name, attribute_path = split_target(target)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    try:
        found: Any = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # sys.exit() at import: no queue either, whatever its code
        raise _import_error(module_name, target, exc) from None
    walked = module_name
    for part in attribute_path.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise CommandError(f"{walked!r} has no attribute {part!r} (from {target!r})") from None
        except (Exception, SystemExit) as exc:  # a property, or a module __getattr__, of the user's raised
            raise _raised(f"reading {target!r}", exc) from None
        walked = f"{walked}{'.' if walked != module_name else ':'}{part}"
    if not isinstance(found, Queue):
        shown = repr(found)
        if len(shown) > _REPR_WIDTH:
            shown = shown[:_REPR_WIDTH - 3] + "..."
        kind = type(found).__qualname__
        if type(found).__module__ != "builtins":
            kind = f"{type(found).__module__}.{kind}"
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        raise CommandError(f"{target!r} is {article} {kind} ({shown}), not a tinymq.Queue")
    if getattr(found, "broker", None) is None:
        raise CommandError(f"{target!r} is a tinymq.Queue without a broker: worker processes share a "
                           "queue through Redis; build it with Queue(..., broker=RedisBroker(url, name=...))")
    # Each worker process calls start_dispatcher() itself, which a started or stopped queue refuses.
    dispatcher = found._dispatcher
    if dispatcher.stopping:
        raise CommandError(f"{target!r} is a stopped tinymq.Queue (its module called stop() when it was "
                           "imported): a stopped queue cannot be started again")
    if dispatcher._started:
        found.stop(wait=True)  # what it fetched goes back to the broker before this process exits
        raise CommandError(f"{target!r} was started when its module was imported (start_dispatcher() ran "
                           "at import): each worker process starts it itself; call start_dispatcher() "
                           "only where the module is run as a program (if __name__ == '__main__':)")
    return found


class _SignalWakeup:
    """Signals that only write their numbers to a socket, for the main loop to read (main thread only).

    The handlers do nothing else, so no Python code runs inside a signal
    handler while the main thread may hold a lock. The interpreter writes there
    the number of every signal that has a Python handler, the user module's too
    (a SIGUSR1 or SIGHUP of its own): those are not ours, and left out.
    """

    def __init__(self, signals: Tuple[int, ...]) -> None:
        self._signals = frozenset(signals)
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        for number in signals:
            signal.signal(number, _ignore)

    def take_back(self) -> None:
        """Install our handlers (and the wakeup socket) again: the user's module may have changed them at
        import (SIG_IGN, SIG_DFL or a handler of its own, as some libraries do), and this process's stop
        is ours. A change is logged (one made by C code, which Python does not see, is replaced quietly)."""
        replaced = []
        for number in sorted(self._signals):
            previous = signal.getsignal(number)
            if previous is not _ignore:
                shown = previous.name if isinstance(previous, signal.Handlers) else repr(previous)
                replaced.append(f"{signal.Signals(number).name} ({shown})")
            signal.signal(number, _ignore)
        if signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False) != self._writer.fileno():
            replaced.append("the signal wakeup fd")
        if replaced:
            logger.warning("importing the target changed the handling of %s: replaced, this worker process "
                           "handles its stop signals itself (a graceful stop)", ", ".join(replaced))

    def fileno(self) -> int:
        return self._reader.fileno()

    def received(self) -> List[int]:
        """Those of our signals that came since the last call (their numbers), oldest first."""
        try:
            return [number for number in self._reader.recv(_READ_SIZE) if number in self._signals]
        except BlockingIOError:
            return []


def _ignore(number: int, frame: Any) -> None:
    """The Python-level handler: the number is written to the wakeup socket by the interpreter."""


# --- a child ----------------------------------------------------------------------------


def _exit_at_once(code: int) -> NoReturn:
    """End a process that loaded the target and runs no queue (the check, or a bad target): a thread
    that the user's module started at import (not a daemon) would keep the interpreter from exiting,
    and the supervisor waiting for it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _LoadingWatch:
    """While the target loads (an import may hang), a daemon thread ends this process when the
    supervisor's pipe closes (the supervisor died, and nothing else would notice before the load
    ends), or when a stop signal comes: nothing of the queue runs yet, so there is nothing to stop.

    ``loaded()`` hands the watch over to the caller: from then on a closed pipe, and the signals
    that come, are its to handle. ``loaded_fd``: the pipe to the supervisor on which the process
    says, once, that it loaded the target (``said_loaded``) or stops while loading it.
    """

    def __init__(self, pipe: int, wakeup: Optional[_SignalWakeup], loaded_fd: Optional[int] = None) -> None:
        self._pipe = pipe
        self._wakeup = wakeup
        self._lock = threading.Lock()
        self._loading = True
        self._loaded_fd = loaded_fd  # guarded by _lock: written to and closed once
        threading.Thread(target=self._watch, name="tinymq-supervisor-pipe", daemon=True).start()

    def _watch(self) -> None:
        watched: List[Any] = [self._pipe] if self._wakeup is None else [self._pipe, self._wakeup]
        while True:
            readable, _, _ = select.select(watched, [], [])
            with self._lock:  # (the signals read here are read while loading only: the caller's after)
                if not self._loading:
                    return
                if self._pipe in readable and not os.read(self._pipe, _READ_SIZE):
                    os._exit(EXIT_SUPERVISOR_GONE)  # (the supervisor writes nothing: this is the end)
                if self._wakeup is not None and self._wakeup in readable:
                    for number in self._wakeup.received():
                        logger.info("stopping (%s) while loading the target: nothing started, nothing "
                                    "to stop", signal.Signals(number).name)
                        self._say(_SAID_STOPPED_LOADING)  # (a stop: not an import that ended the process)
                        _exit_at_once(0)

    def _say(self, what: bytes) -> None:
        """Write ``what`` to the supervisor's --loaded-fd pipe, the first time only. With _lock held."""
        if self._loaded_fd is not None:
            os.write(self._loaded_fd, what)
            os.close(self._loaded_fd)
            self._loaded_fd = None

    def said_loaded(self) -> None:
        """Tell the supervisor that the target is loaded (an exit from now on is a crash)."""
        with self._lock:
            self._say(_SAID_LOADED)

    def loaded(self) -> None:
        with self._lock:
            self._loading = False


def _end_fork(target: str, check: bool) -> NoReturn:
    """End this process, a fork that importing ``target`` made (a module that daemonises): it never
    reports the target loaded, nor runs it, nor repeats its parent's error. A check's fork tells the
    supervisor (``_FORKED``), which says it in its one error or warning; a worker's logs it."""
    if check:
        sys.stderr.write(_FORKED)
    else:
        logger.warning("importing %s forked this process (pid %d): the fork exits; the worker process the "
                       "supervisor started (pid %d) goes on", target, os.getpid(), os.getppid())
    _exit_at_once(EXIT_BAD_TARGET)


def run_child(target: str, workers: int, check: bool, loaded_fd: Optional[int] = None) -> int:
    """A worker process: load the queue, run it until told to stop, stop it gracefully.

    With ``check``, only load the target (the supervisor does this once before
    starting the children, to report a bad target once). ``loaded_fd``: a pipe
    to the supervisor, written to once the target is loaded (so that an exit
    with EXIT_BAD_TARGET after that is a crash). Returns the exit code.
    """
    wakeup = None if check else _SignalWakeup(_STOP_SIGNALS)  # before the import: it may be slow
    supervisor_pipe = sys.stdin.fileno()
    watch = _LoadingWatch(supervisor_pipe, wakeup, loaded_fd)
    pid = os.getpid()
    try:
        queue = load_queue(target)
    except CommandError as exc:
        if os.getpid() != pid:  # a fork: its parent, which failed alike or ended, says what happened
            _end_fork(target, check)
        # The supervisor shows a check's message as its own error; a worker's goes among the logs.
        print(f"{_ERROR_FOLLOWS}{exc}" if check else f"tinymq worker: error: {exc}", file=sys.stderr, flush=True)
        _exit_at_once(EXIT_BAD_TARGET)  # nothing of tinymq runs: no queue, or one stopped already
    if os.getpid() != pid:  # the import forked (a module that daemonises) and this is the fork
        _end_fork(target, check)
    if wakeup is not None:  # before saying "loaded": from then on, a stop signal must reach us
        wakeup.take_back()
    watch.said_loaded()
    if wakeup is None:
        _exit_at_once(0)
    watch.loaded()
    stop_reason = None
    for number in wakeup.received():  # a signal that came during the import
        stop_reason = signal.Signals(number).name
    if stop_reason is None:
        queue.start_dispatcher(workers)
        logger.info("worker process started: %s for %s", counted(workers, "worker thread"), target)
    while stop_reason is None:
        readable, _, _ = select.select([wakeup, supervisor_pipe], [], [])
        for number in wakeup.received():
            stop_reason = signal.Signals(number).name
        if supervisor_pipe in readable and not os.read(supervisor_pipe, _READ_SIZE):
            stop_reason = stop_reason or "the supervisor exited"
    # Signals that come now change nothing: a supervisor that forwards one after systemd sent it
    # to the whole control group must not hurry a graceful stop. The hard stop is its SIGKILL.
    logger.info("stopping (%s): running attempts finish, buffered jobs go back to the queue", stop_reason)
    queue.stop(wait=True)
    logger.info("worker process stopped")
    # Ignored from now to the end: the interpreter's exit would put back their default action
    # (death), and the supervisor (or systemd) may still send one.
    for number in _STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    # A thread that the user's module started (not a daemon) would keep the interpreter from exiting,
    # for ever if nothing stops it (the module has no say in this stop), and the supervisor waiting.
    left = [thread.name for thread in threading.enumerate()
            if not thread.daemon and thread is not threading.main_thread()]
    if left:
        logger.warning("exiting without waiting for thread(s) %s (not daemon threads: started by the target's "
                       "module, which nothing here stops)", ", ".join(map(repr, left)))
        atexit._run_exitfuncs()  # what an exit runs, but the wait for those threads
        _exit_at_once(0)
    return 0


# --- the supervisor ---------------------------------------------------------------------


class _Slot:
    """One of the ``--processes`` places: its current child, and when to start the next."""

    __slots__ = ("number", "process", "loaded", "said", "stop_unheard", "started", "restart_at", "delay")

    def __init__(self, number: int) -> None:
        self.number = number
        self.process: Optional["subprocess.Popen[bytes]"] = None
        self.loaded: Optional[int] = None  # the read end of the child's --loaded-fd pipe
        self.said: Optional[bytes] = None  # what the child wrote there (b"": closed with nothing), once read
        # SIGTERM was sent to the child before it said it loaded the target: its module may have set
        # SIG_IGN at import, so it is sent again when the child says so.
        self.stop_unheard = False
        self.started = 0.0  # time.monotonic() of the current child's start
        self.restart_at: Optional[float] = None  # time.monotonic() at which to start the next child
        self.delay = _FIRST_RESTART_DELAY  # before the next restart, doubling while crashes come soon


def _wait_readable(watched: Sequence[Union[_SignalWakeup, IO[bytes], int]], timeout: Optional[float]) -> Set[int]:
    """The descriptors of ``watched`` that can be read (or were closed at the other end) within
    ``timeout`` seconds (None: no limit). poll(), not select(): select() refuses descriptors numbered
    1024 or more, which the pipes of some hundreds of worker processes reach."""
    poller = select.poll()
    for item in watched:
        poller.register(item, select.POLLIN)
    milliseconds = None if timeout is None else math.ceil(timeout * 1000)
    return {fd for fd, _ in poller.poll(milliseconds)}


def _open_closed_standard_fds() -> None:
    """Open the null device on stdin, stdout or stderr where this process was started without them
    (a daemon's way): the worker processes inherit them, and run the user's code, with them open."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)
            os.set_inheritable(fd, True)  # (os.open's is not)


def _pass_on(stream: Optional[TextIO], output: bytes) -> None:
    """Write ``output`` (bytes the check printed) to ``stream``: None when this process was started
    with that descriptor closed (then, as print() does, nothing is written)."""
    if stream is not None:
        stream.flush()
        stream.buffer.write(output)
        stream.flush()


_OPTIONS_WITH_VALUE = "WX"  # interpreter options whose value follows, in the same argument or the next
_LAST_OPTIONS = "cm"  # -c and -m end the interpreter's options: the rest is the program's
_LONG_OPTIONS_WITH_VALUE = ("--check-hash-based-pycs",)


def _given_unbuffered(argv: Sequence[str]) -> bool:
    """Whether the interpreter's own arguments ``argv`` (``sys.orig_argv``) hold ``-u``.

    Read as CPython reads them: letters grouped (``-Ou``), up to the script,
    ``-c`` or ``-m``; a value of ``-W`` or ``-X`` is no option.
    """
    arguments = iter(argv[1:])
    for argument in arguments:
        if argument in _LONG_OPTIONS_WITH_VALUE:
            next(arguments, None)
            continue
        if argument in ("-", "--") or not argument.startswith("-"):
            return False  # stdin, the end of the options, or the script
        if argument.startswith("--"):
            continue
        for index, letter in enumerate(argument[1:], 1):
            if letter == "u":
                return True
            if letter in _LAST_OPTIONS:
                return False
            if letter in _OPTIONS_WITH_VALUE:
                if index == len(argument) - 1:
                    next(arguments, None)
                break
    return False


def _interpreter_options() -> List[str]:
    """The interpreter's options this process was given, for a child: multiprocessing's, and -u.

    ``sys.flags`` does not show -u (the variable PYTHONUNBUFFERED, which the
    child inherits anyway, neither): the interpreter's own arguments do, from
    Python 3.10; before, standard streams that write through do (-u or the
    variable: either way the child runs unbuffered).
    """
    options: List[str] = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]  # private: not in typeshed
    orig_argv = getattr(sys, "orig_argv", None)
    if orig_argv is not None:
        unbuffered = _given_unbuffered(orig_argv)
    else:  # pragma: no cover - Python 3.9
        unbuffered = any(getattr(stream, "write_through", False) for stream in (sys.__stdout__, sys.__stderr__))
    if unbuffered:
        options.append("-u")
    return options


def _exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Supervisor:
    """Runs ``processes`` worker children for ``target`` until SIGTERM/SIGINT."""

    def __init__(self, target: str, processes: int, workers: int, log_level: str) -> None:
        self.target = target
        self.workers = workers
        self.log_level = log_level
        self.slots = [_Slot(number) for number in range(processes)]
        self.stopping = False
        self.exit_code = 0

    def _command(self, *extra: str) -> List[str]:
        # With the interpreter's options this command was given (-O, -X, -W, -u...), as multiprocessing does.
        return [sys.executable, *_interpreter_options(), "-m", "tinymq", "_worker-child", self.target,
                "--workers", str(self.workers), "--log-level", self.log_level, *extra]

    def check_target(self, wakeup: _SignalWakeup) -> bool:
        """Load the target once in a child of its own: a bad one is reported once, before any start.

        False when a stop signal came first: the check (an import that may hang) is killed.
        """
        # stdin: a pipe, as a worker process has, that closes when this process ends however it ends.
        # The check says it loaded the target through a pipe of its own: exiting 0 does not say so (an
        # import may end its process).
        reader, writer = os.pipe()
        try:
            try:
                process = subprocess.Popen(self._command("--check", "--loaded-fd", str(writer)),
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           pass_fds=(writer,))
            except OSError as exc:
                raise CommandError(f"could not start the process that checks {self.target!r}: {exc}") from None
            finally:
                os.close(writer)
            return self._read_check(process, reader, wakeup)
        finally:
            os.close(reader)

    def _read_check(self, process: "subprocess.Popen[bytes]", loaded: int, wakeup: _SignalWakeup) -> bool:
        """Pass on what the check prints; its verdict once it has exited (``loaded``: its --loaded-fd pipe)."""
        stdin_pipe, stdout_pipe, stderr_pipe = process.stdin, process.stdout, process.stderr
        if stdin_pipe is None or stdout_pipe is None or stderr_pipe is None:  # (never: opened as pipes)
            raise CommandError(f"the process that checks {self.target!r} has no pipes")
        output = {stdout_pipe: bytearray(), stderr_pipe: bytearray()}
        streams = list(output)
        exited = math.inf  # monotonic time the check was seen to have exited
        while streams:
            # A process that the import forked (a helper that runs on) keeps the pipes open: once the
            # check has exited, what it printed is in them, and a fork that ends as it should
            # (_end_fork) has said so within _CHECK_FORK_WAIT; the pipes are not waited for longer.
            wait = None if exited == math.inf else max(0.0, exited + _CHECK_FORK_WAIT - time.monotonic())
            readable = _wait_readable([wakeup, *streams], wait)
            if any(number != signal.SIGCHLD for number in wakeup.received()):
                process.kill()
                process.wait()
                for pipe in (stdin_pipe, *output):
                    pipe.close()
                logger.info("stopped while loading %r, before any worker process started", self.target)
                return False
            for stream in streams[:]:
                if stream.fileno() not in readable:
                    continue
                chunk = os.read(stream.fileno(), _CHECK_READ_SIZE)
                if chunk:
                    output[stream] += chunk
                else:
                    stream.close()
                    streams.remove(stream)
            if exited == math.inf and process.poll() is not None:
                exited = time.monotonic()
            elif not readable and time.monotonic() >= exited + _CHECK_FORK_WAIT:
                for stream in streams:
                    stream.close()
                break
        returncode = process.wait()
        stdin_pipe.close()
        stdout, stderr = bytes(output[stdout_pipe]), bytes(output[stderr_pipe])
        forked = _FORKED.encode() in stderr  # (a fork of the check, ended: see _end_fork)
        stderr = stderr.replace(_FORKED.encode(), b"")
        _pass_on(sys.stdout, stdout)  # whatever the user's module printed at import
        if returncode == EXIT_BAD_TARGET:
            imported, _, error = stderr.rpartition(_ERROR_FOLLOWS.encode())
            _pass_on(sys.stderr, imported)
            raise CommandError(error.decode(errors="replace").strip())
        _pass_on(sys.stderr, stderr)
        if returncode != 0:
            raise CommandError(f"loading {self.target!r} failed: the process that checked it "
                               f"{_exit_description(returncode)}")
        os.set_blocking(loaded, False)
        try:
            said_loaded = os.read(loaded, 1) == _SAID_LOADED
        except BlockingIOError:  # nothing written, and the write end still open (a process it started has it)
            said_loaded = False
        if not said_loaded:
            if forked:
                raise CommandError(f"loading {self.target!r} failed: importing the module forked the process that "
                                   "checked it, which then exited with code 0 before it had loaded the target (a "
                                   "module that daemonises at import); the supervisor starts the worker processes "
                                   "itself: do not fork when the module is imported")
            raise CommandError(f"loading {self.target!r} failed: the process that checked it exited with "
                               "code 0 before it had loaded the target (importing the module ended the process)")
        if forked:
            logger.warning("importing %r forked the process that checked it; the fork was ended, as it will be "
                           "in each worker process: only the processes the supervisor starts run the queue",
                           self.target)
        return True

    def _start(self, slot: _Slot) -> None:
        try:
            reader, writer = os.pipe()
            try:
                # stdin: a pipe the child reads until it closes, when this process ends, however it ends.
                slot.process = subprocess.Popen(self._command("--loaded-fd", str(writer)),
                                                stdin=subprocess.PIPE, start_new_session=True,
                                                pass_fds=(writer,))
            except BaseException:
                os.close(reader)
                raise
            finally:
                os.close(writer)
        except OSError as exc:  # out of descriptors, processes or memory: perhaps not for long
            slot.restart_at = time.monotonic() + slot.delay
            logger.error("could not start worker process %d (%s); trying again in %.1f s", slot.number, exc,
                         slot.delay)
            slot.delay = min(slot.delay * 2, _MAX_RESTART_DELAY)
            return
        os.set_blocking(reader, False)
        slot.loaded = reader
        slot.said = None
        slot.stop_unheard = False
        slot.started = time.monotonic()
        slot.restart_at = None
        logger.info("started worker process %d (pid %d)", slot.number, slot.process.pid)

    def _reap(self, slot: _Slot) -> None:
        """Notice that the slot's child has exited; schedule its restart unless stopping."""
        process = slot.process
        if process is None or process.poll() is None:
            return
        slot.process = None
        if process.stdin is not None:
            process.stdin.close()
        said = self._close_loaded(slot)
        loaded = said == _SAID_LOADED
        code = process.returncode
        if self.stopping:
            # SIGTERM before it loaded the target: it was still starting, nothing to stop. After, our
            # handler was in place (run_child): a death by SIGTERM is a graceful stop that did not happen.
            if code != 0 and not (code == -signal.SIGTERM and not loaded):
                logger.error("worker process %d (pid %d) %s while stopping", slot.number, process.pid,
                             _exit_description(code))
                self.exit_code = 1
            return
        if code == EXIT_BAD_TARGET and not loaded:
            logger.error("worker process %d (pid %d) could not load %r (see its error above): stopping",
                         slot.number, process.pid, self.target)
            self.exit_code = 1
            self._begin_stop()
            return
        if code == 0 and not said:  # as the check's verdict: starting it again would end the same way
            logger.error("worker process %d (pid %d) exited with code 0 before it had loaded %r (importing the "
                         "module ended the process): stopping", slot.number, process.pid, self.target)
            self.exit_code = 1
            self._begin_stop()
            return
        now = time.monotonic()
        if now - slot.started >= _STABLE_AFTER:
            slot.delay = _FIRST_RESTART_DELAY
        slot.restart_at = now + slot.delay
        logger.error("worker process %d (pid %d) %s; starting it again in %.1f s", slot.number,
                     process.pid, _exit_description(code), slot.delay)
        slot.delay = min(slot.delay * 2, _MAX_RESTART_DELAY)

    @staticmethod
    def _read_loaded(slot: _Slot) -> Optional[bytes]:
        """What the slot's child wrote on its --loaded-fd pipe (_SAID_LOADED, _SAID_STOPPED_LOADING; b""
        when it closed it having written nothing), or None while it has written nothing yet."""
        if slot.said is None and slot.loaded is not None:
            try:
                slot.said = os.read(slot.loaded, 1)
            except BlockingIOError:  # nothing written, and the write end still open
                pass
        return slot.said

    def _close_loaded(self, slot: _Slot) -> bytes:
        """Close the slot's --loaded-fd pipe: what its child wrote there (_SAID_LOADED,
        _SAID_STOPPED_LOADING), or b"" when it wrote nothing (the write end may still be
        open: a grandchild has it)."""
        said = self._read_loaded(slot)
        if slot.loaded is not None:
            os.close(slot.loaded)
        slot.loaded, slot.said, slot.stop_unheard = None, None, False
        return said or b""

    def _tell_again(self, slot: _Slot) -> None:
        """The child of ``slot``, sent SIGTERM before it said it loaded the target, wrote on its pipe:
        once loaded it handles SIGTERM itself, so it is sent again (a module that set SIG_IGN at import
        ignored the first); the child's handler makes a second one harmless."""
        said = self._read_loaded(slot)
        if said is None:
            return
        slot.stop_unheard = False
        if said == _SAID_LOADED and slot.process is not None and slot.process.poll() is None:
            logger.info("worker process %d (pid %d) loaded the target after the stop signal: sent again",
                        slot.number, slot.process.pid)
            slot.process.send_signal(signal.SIGTERM)

    def _begin_stop(self) -> None:
        self.stopping = True
        for slot in self.slots:
            slot.restart_at = None
            if slot.process is not None and slot.process.poll() is None:
                slot.stop_unheard = self._read_loaded(slot) is None
                slot.process.send_signal(signal.SIGTERM)

    def _reap_orphans(self) -> None:
        """Reap the exited processes that are not our children's but were handed to us: as PID 1 (a
        container's entry point) or a subreaper, the orphans of the programs that jobs ran are ours
        to reap, or they stay zombies for ever. A child of ours is left to _reap."""
        ours = {slot.process.pid for slot in self.slots if slot.process is not None}
        while True:
            try:  # (WNOWAIT: look without reaping, in case it is ours)
                exited = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if exited is None or exited.si_pid in ours:
                return  # (one of ours exited since _reap looked: the next round reaps both)
            os.waitpid(exited.si_pid, 0)

    def _kill_all(self) -> None:
        """The hard stop: SIGKILL to each child's process group, the programs its running jobs started
        too (it leads a session of its own: nothing else would end them, and their jobs run again)."""
        for slot in self.slots:
            if slot.process is not None:
                if slot.process.returncode is None:  # (not reaped: its pid is still its own)
                    try:
                        os.killpg(slot.process.pid, signal.SIGKILL)
                    except ProcessLookupError:  # (ended and reaped meanwhile, by no one of ours: never)
                        pass
                slot.process.kill()
                slot.process.wait()
                slot.process = None
                self._close_loaded(slot)

    def run(self) -> int:
        """Start the children and supervise them; returns the exit code (0 after a clean stop)."""
        _open_closed_standard_fds()  # before any pipe or socket of ours could take their numbers
        wakeup = _SignalWakeup(_STOP_SIGNALS + (signal.SIGCHLD,))  # before the check: it may hang
        if not self.check_target(wakeup):
            return 0  # asked to stop before anything started: a clean stop
        for slot in self.slots:
            self._start(slot)
        logger.info("supervising %s for %s (%s each); SIGTERM or Ctrl-C stops them gracefully",
                    counted(len(self.slots), "worker process", "worker processes"), self.target,
                    counted(self.workers, "thread"))
        while True:
            for slot in self.slots:
                self._reap(slot)
            self._reap_orphans()
            if self.stopping and all(slot.process is None for slot in self.slots):
                logger.info("all worker processes stopped")
                return self.exit_code
            now = time.monotonic()
            for slot in self.slots:
                if slot.restart_at is not None and slot.restart_at <= now:
                    self._start(slot)
            pending = [slot.restart_at for slot in self.slots if slot.restart_at is not None]
            timeout = max(0.0, min(pending) - now) if pending else None
            unheard = [(slot, slot.loaded) for slot in self.slots if slot.stop_unheard and slot.loaded is not None]
            readable = _wait_readable([wakeup, *(loaded for _, loaded in unheard)], timeout)
            for slot, loaded in unheard:
                if loaded in readable:
                    self._tell_again(slot)
            for number in wakeup.received():
                if number == signal.SIGCHLD:
                    continue
                name = signal.Signals(number).name
                if self.stopping:
                    logger.warning("second %s while stopping: hard stop, killing the worker processes",
                                   name)
                    self._kill_all()
                    return 1
                logger.info("%s: stopping the worker processes gracefully (a second one kills them)",
                            name)
                self._begin_stop()
