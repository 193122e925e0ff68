"""``python -m tinymq``: the demo, and the commands ``status``, ``requeue-dead``, ``purge-dead``, ``worker``.

With no arguments it runs the demo (``_demo.py``). Exit codes: 0 done, 1 an
error (one clear line on stderr, no traceback, for a user's mistake), 2 bad
usage (argparse).
"""
import argparse
import os
import sys
from typing import Any, List, Optional, Sequence

from . import HAS_EXTENSION, __version__
from ._cli import (LOG_LEVELS, MAX_PROCESSES, MAX_WORKERS, CommandError, configure_logging, process_count,
                   whole_number, worker_count)
from ._demo import DESCRIPTION as DEMO_DESCRIPTION
from ._demo import run_demo
from ._status import (_REDIS_DEAD_MAX, change_dead_in_db, change_dead_in_redis, db_status, redis_status,
                      render_status)
from ._worker import Supervisor, default_workers, run_child, split_target


_CHILD_COMMAND = "_worker-child"  # how `worker` starts each worker process (not a public command)
_DEAD_LIMIT = 20  # dead jobs that the status table lists by default


def _logging_option(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=default,
                        help=f"messages on stderr from this level up (default {default})")


def _queue_options(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", metavar="PATH", type=_db_path,
                       help="the SQLite file of a queue's SQLitePersistence store")
    where.add_argument("--redis", metavar="URL", help="the Redis server of a shared queue (with --name)")
    parser.add_argument("--name", help="the shared queue's name, as given to RedisBroker(name=...)")
    parser.set_defaults(parser=parser)  # to report a usage error as this command's


def _check_queue_options(arguments: argparse.Namespace) -> None:
    if arguments.redis is not None and not arguments.name:
        arguments.parser.error("--redis needs --name (the queue's name, as given to RedisBroker)")
    if arguments.db is not None and arguments.name is not None:
        arguments.parser.error("--name goes with --redis, not --db")


def _ids_options(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("ids", nargs="*", metavar="ID", help=f"the dead jobs to {verb}")
    parser.add_argument("--all", action="store_true", help=f"{verb} every dead job")


def _db_path(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError(f"expected the path of a SQLite file, got {text!r}")
    return text


def _target(text: str) -> str:
    try:
        split_target(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


class _Parser(argparse.ArgumentParser):
    """The public parser (its commands' too): ``--help`` and ``--version`` to a stdout that is closed
    (``>&-``) or takes no more (a full disk, /dev/full) is one clear error and exit 1, as every
    command's output is; argparse writes them to stderr when stdout is closed, ignores a failed
    write, and exits 0 either way, as if the text had been shown."""

    def __init__(self, *, add_help: bool = True, **kwargs: Any) -> None:
        super().__init__(add_help=False, **kwargs)
        if add_help:  # (argparse's own, but for the option named in the closed-stdout error: -h or --help)
            self.add_argument("-h", "--help", action=_PrintAction, help="show this help message and exit")

    def print_out(self, text: str, option: str) -> None:
        """Write ``text``, what ``option`` prints, to stdout."""
        out = sys.stdout
        if out is None:  # (closed: Python's sys.stdout is None)
            self.exit(1, f"{self.prog}: error: stdout is closed: {option} prints there, and would show "
                         "nothing (give it stdout, or >/dev/null to discard it)\n")
        try:
            out.write(text)
            out.flush()
        except BrokenPipeError:  # (`| head`: goes on up, and ends the command quietly)
            raise
        except OSError as exc:
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())  # (no second error as Python exits)
            self.exit(1, f"{self.prog}: error: could not write to stdout ({exc})\n")


class _PrintAction(argparse.Action):
    """``-h``/``--help`` (``text`` None: the parser's help) or ``--version`` (``text``): print it
    with ``_Parser.print_out``, which names the option as typed if stdout is closed, and exit 0."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 help: Optional[str] = None, text: Optional[str] = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)
        self.text = text

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: Optional[str] = None) -> None:
        assert isinstance(parser, _Parser)
        text = parser.format_help() if self.text is None else self.text + "\n"
        parser.print_out(text, option_string or self.option_strings[-1])
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m tinymq",
        description="tinymq's command line. With no command, it runs the demo (see `demo --help`).",
    )
    core = "compiled core" if HAS_EXTENSION else "pure-Python core"
    parser.add_argument("--version", action=_PrintAction, text=f"tinymq {__version__} ({core})",
                        help="print tinymq's version and which core it runs, and exit")
    commands = parser.add_subparsers(dest="command")

    commands.add_parser("demo", help="the live tour (what `python -m tinymq` alone runs)",
                        description=DEMO_DESCRIPTION)

    status = commands.add_parser(
        "status", help="a queue's sizes, counts and dead jobs",
        description="Print a queue's sizes, counts and dead jobs. --db opens the file read-only: "
                    "it works while a live queue owns it, and changes nothing. --redis reads the shared "
                    "queue without registering as a worker process.")
    _queue_options(status)
    status.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    status.add_argument("--limit", type=whole_number, default=_DEAD_LIMIT, metavar="N",
                        help=f"dead jobs the table lists, the newest (default {_DEAD_LIMIT}; 0: all; "
                             f"--json lists all; with --redis, at most the newest {_REDIS_DEAD_MAX})")
    _logging_option(status, "WARNING")

    for verb, what in (("requeue", "back to ready, retries reset (with --db they run at the next start "
                                   "of a queue on the file)"),
                       ("purge", "deleted for good")):
        command = commands.add_parser(
            f"{verb}-dead", help=f"dead jobs {what.split(' (')[0]}",
            description=f"Dead jobs, those given by id or --all, {what}. With --db this changes the "
                        "file, so it needs the file to itself: while a live queue owns it, this fails "
                        "naming the owner's pid. All or nothing: an id that is not a dead job changes "
                        "nothing.")
        _queue_options(command)
        _ids_options(command, verb)
        _logging_option(command, "WARNING")

    worker = commands.add_parser(
        "worker", help="run worker processes for a Queue with a broker",
        description="Run worker processes for the tinymq.Queue at TARGET (a Queue built with a broker, "
                    "so that the processes share it). SIGTERM or SIGINT stops them gracefully: running "
                    "attempts finish and buffered jobs go back to the broker; a second one kills them. "
                    "A worker process that crashes is started again.")
    worker.add_argument("target", metavar="TARGET", type=_target,
                        help="package.module:queue (the attribute may be a dotted path: module:app.queue)")
    worker.add_argument("--processes", type=process_count, default=1, metavar="N",
                        help=f"worker processes (default 1, at most {MAX_PROCESSES})")
    worker.add_argument("--workers", type=worker_count, default=None, metavar="M",
                        help="worker threads per process, start_dispatcher(M) (default: the number of "
                             f"CPUs, or 4 when it cannot be told; at most {MAX_WORKERS})")
    _logging_option(worker, "INFO")
    return parser


def _build_child_parser() -> argparse.ArgumentParser:
    """``_worker-child``: run by `worker` only, once per worker process (and once with --check before
    they start); parsed apart, so that no help or usage error of the public parser lists it."""
    child = argparse.ArgumentParser(prog=f"python -m tinymq {_CHILD_COMMAND}")
    child.add_argument("target")
    child.add_argument("--workers", type=worker_count, required=True)
    child.add_argument("--check", action="store_true")
    child.add_argument("--loaded-fd", type=int, default=None)  # written to once the target is loaded
    _logging_option(child, "INFO")
    child.set_defaults(command=_CHILD_COMMAND)
    return child


def _change_dead(arguments: argparse.Namespace) -> int:
    _check_queue_options(arguments)
    if bool(arguments.ids) == arguments.all:
        arguments.parser.error("give the ids of the dead jobs, or --all (not both)")
    ids: Optional[List[str]] = None if arguments.all else arguments.ids
    action = arguments.command.split("-")[0]
    if arguments.db is not None:
        outcome = change_dead_in_db(arguments.db, action, ids)
    else:
        outcome = change_dead_in_redis(arguments.redis, arguments.name, action, ids)
    _print(outcome, f"; the {action} itself was done")
    return 0


def _print(text: str, done: str = "") -> None:
    """Print a command's outcome: stdout that takes no more (a full disk, /dev/full) is one clear
    error (``done``: what was done all the same), not a traceback. A closed pipe (``| head``)
    goes on up, and ends the command quietly."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        raise
    except OSError as exc:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no second error as Python exits)
        raise CommandError(f"could not write to stdout ({exc}){done}") from None


def _escape_what_stdout_cannot_show() -> None:
    """A character that stdout's encoding cannot show (a Japanese job type on an ASCII or cp1252
    console) is written escaped, as Python writes it (``\\xe9``), not a UnicodeEncodeError."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)  # (a replaced stdout may not have it)
    if reconfigure is not None:
        reconfigure(errors="backslashreplace")


def _check_stdout(command: Optional[str]) -> None:
    """A command that prints its outcome refuses to run, before it changes anything, when stdout is
    closed (``>&-``: Python's sys.stdout is None, and print() writes nothing): its exit code would
    say done though nobody can see what it found."""
    if sys.stdout is None:
        raise CommandError(f"stdout is closed: {command or 'the demo'} prints its outcome there, and "
                           "would show nothing (give it stdout, or >/dev/null to discard it)")


def run(arguments: argparse.Namespace) -> int:
    command = arguments.command
    if command in (None, "demo", "status", "requeue-dead", "purge-dead"):  # (not worker: it logs on stderr)
        _check_stdout(command)
    if command in (None, "demo"):
        return run_demo()
    configure_logging(arguments.log_level)
    if command in ("status", "requeue-dead", "purge-dead"):
        _escape_what_stdout_cannot_show()
    if command == "status":
        _check_queue_options(arguments)
        if arguments.db is not None:
            report = db_status(arguments.db)
        else:  # (the dead jobs it lists, and no more, are read from Redis)
            report = redis_status(arguments.redis, arguments.name, 0 if arguments.json else arguments.limit)
        _print(render_status(report, as_json=arguments.json, limit=arguments.limit))
        return 0
    if command in ("requeue-dead", "purge-dead"):
        return _change_dead(arguments)
    workers = arguments.workers or default_workers()
    if command == "worker":
        return Supervisor(arguments.target, arguments.processes, workers, arguments.log_level).run()
    return run_child(arguments.target, workers, arguments.check, arguments.loaded_fd)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [_CHILD_COMMAND]:
        parser, argv = _build_child_parser(), argv[1:]
    else:
        parser = build_parser()
    arguments = parser.parse_args(argv)
    try:
        return run(arguments)
    except CommandError as exc:
        command = parser.prog if arguments.command is None else f"{parser.prog} {arguments.command}"
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the signal handling of `worker` is in place, or in a status
        return 130


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BrokenPipeError:  # `python -m tinymq | head`: stop quietly, like other CLI tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1)
