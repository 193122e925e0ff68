"""Findings of attack28c (an outside attack on ``python -m tinymq worker`` and ``status``, run as a
deployment runs them).

1. ``status --redis URL --name NAME`` with a mistyped name, on a server whose queue had worker
   processes and no job yet (a fresh deployment, checked before the first enqueue), said that
   the server "holds no tinymq queue": ``broker.names_in_use()`` listed only queues with
   counters, while ``in_use()`` (and docs/cli.md, "the queue names the server does hold") count
   a worker's lease and a limit too.
2. ``worker`` started with stdout and stderr closed (``>&- 2>&-``, a daemon's way) exited 1 at
   once, silently: it wrote what the check printed to ``sys.stdout``, which Python sets to None
   then. Its worker processes now get the null device there, not a closed descriptor.
3. The supervisor waited with ``select()``, which refuses descriptors numbered 1024 or more
   (the pipes of some 500 worker processes, under a container's descriptor limit): a stop
   signal while a worker process was still loading the target ended it with a ValueError
   traceback, exit 1. It now waits with ``poll()``.
4. ``python -O -X faulthandler -W ... -m tinymq worker``: the worker processes (and the check)
   were started as ``python -m tinymq``, without the interpreter's options the command was
   given; they now get them, as multiprocessing's spawned processes do.
5. A hard stop (a second SIGTERM/SIGINT) killed the worker processes but not the programs that
   their running jobs had started: those ran on, orphaned, while the jobs ran again elsewhere
   once their leases ran out. Each worker process leads a session of its own; the hard stop now
   kills its process group.
6. The supervisor as a container's PID 1 (no init): the orphans of the programs that jobs ran
   are handed to it, and it never reaped them: one zombie per such job, for ever. It now reaps
   every exited process that is not one of its worker processes.
"""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import tinymq
from tinymq._cli import CommandError
from tinymq._status import redis_status
from tinymq.redis import RedisBroker

from test_cli import (LEASE, TIMEOUT, WorkerCLI, alive, env, eventually, pop, producer, project,  # noqa: F401
                      record, record_jobs, shared_project)

pytestmark = [pytest.mark.redis, pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="Linux: /proc")]


def test_status_of_a_mistyped_name_lists_a_queue_whose_workers_ran_before_any_job(redis_url):
    queue = tinymq.Queue(broker=RedisBroker(redis_url, name="emails"))

    @queue.executor("email", max_concurrent_jobs=5)
    def send(job):
        pass

    queue.start_dispatcher(1)
    try:
        # Its first round writes its limit (a stop() before that round gives the round up, and
        # then the process has left nothing on the server).
        eventually(queue.broker.in_use, "its limit written")
        queue.stop()
        assert queue.broker.in_use()  # its limit stays: what a worker process leaves before the first job
        assert queue.broker.names_in_use() == ["emails"]
        with pytest.raises(CommandError, match=r"holds no tinymq queue named 'emial'.*queues there: emails$"):
            redis_status(redis_url, "emial", 0)
    finally:
        queue.stop()
        queue.broker.close()


# --- 2. `worker` started with stdout and stderr closed ----------------------------------------

def test_worker_started_with_stdout_and_stderr_closed_runs_and_stops_gracefully(shared_project, project,
                                                                                 producer, record, redis_url):
    """A daemon started with its standard descriptors closed (``>&- 2>&-``): the supervisor wrote
    what the check printed to ``sys.stdout``, None there, and exited 1 (its traceback unseen)
    before any worker process started."""
    command = [sys.executable, "-m", "tinymq", "worker", "app.shared:queue", "--workers", "1"]
    supervisor = subprocess.Popen(["sh", "-c", 'exec "$@" >&- 2>&-', "sh", *command], cwd=str(project),
                                  env=env(TINYMQ_TEST_REDIS=redis_url, TINYMQ_TEST_LEASE=str(LEASE)),
                                  stdin=subprocess.DEVNULL)
    try:
        producer.enqueue(record_jobs(1)[0])
        eventually(lambda: record.llen("finished") or supervisor.poll() is not None, "the job run")
        assert supervisor.poll() is None, f"the supervisor exited with code {supervisor.returncode}"
        (job_id, pid), = pop(record, "finished", 1)
        assert job_id == "job-0"
        # Its own stdout and stderr: the null device, not closed (nor one of the supervisor's pipes).
        assert [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (1, 2)] == [os.devnull] * 2
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(TIMEOUT) == 0
        eventually(lambda: not alive(pid), "the worker process ended")
    finally:
        supervisor.kill()
        supervisor.wait()
        for pid in {int(entry.split()[1]) for entry in record.lrange("started", 0, -1)}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- 3. a supervisor whose pipes have numbers past select()'s limit ---------------------------

# Runs `worker` in this process after taking every descriptor below HIGH_FD (what the pipes of
# some 500 worker processes would take; a container's limit allows many more): the pipes of the
# worker processes it starts are numbered from HIGH_FD up.
HIGH_FD = 1100
MANY_FDS = textwrap.dedent(f"""
    import os, resource, sys
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < {HIGH_FD} + 64:
        sys.exit(77)  # (the test is skipped)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, {HIGH_FD} + 64) if hard == resource.RLIM_INFINITY
                                                 else min(hard, max(soft, {HIGH_FD} + 64)), hard))
    taken = [os.open(os.devnull, os.O_RDONLY)]
    while taken[-1] < {HIGH_FD}:
        taken.append(os.open(os.devnull, os.O_RDONLY))
    from tinymq.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")

# Loads for the check, then hangs at import in the worker processes (a slow import, still going
# when the stop signal comes).
HANGS_IN_WORKERS = textwrap.dedent("""
    import sys, time
    from app.shared import queue
    if "--check" not in sys.argv:
        print("importing", flush=True)
        time.sleep(600)
""")


def test_a_stop_while_a_worker_process_loads_works_with_pipes_numbered_past_1024(shared_project, project,
                                                                                  redis_url):
    """The supervisor waited with select(), which refuses a descriptor numbered 1024 or more:
    a SIGTERM while a worker process was still loading the target (its pipe then watched) ended
    the supervisor with a ValueError traceback and exit 1, not a clean stop."""
    (project / "many_fds.py").write_text(MANY_FDS)
    (project / "app" / "hangs_in_workers.py").write_text(HANGS_IN_WORKERS)
    worker = WorkerCLI(project, redis_url, "app.hangs_in_workers:queue", command=["many_fds.py"])
    try:
        worker.wait_for(r"started worker process 0 \(pid \d+\)")
        worker.wait_for(r"^importing$")
        if worker.process.poll() == 77:
            pytest.skip(f"the descriptor limit is below {HIGH_FD}")
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.log()
        assert "Traceback" not in worker.log()
        assert "all worker processes stopped" in worker.log()
    finally:
        worker.kill()


# --- 4. the interpreter's options -------------------------------------------------------------

SHOWS_FLAGS = textwrap.dedent("""
    import sys
    from app.shared import queue
    print(f"flags: optimize={sys.flags.optimize} faulthandler={'faulthandler' in sys._xoptions} "
          f"warnings={sys.warnoptions} in {'check' if '--check' in sys.argv else 'worker'}", flush=True)
""")


def test_worker_processes_run_with_the_interpreter_options_the_command_was_given(shared_project, project,
                                                                                   redis_url):
    """``python -O -X faulthandler -W error::ResourceWarning -m tinymq worker ...``: the worker
    processes, which run the jobs, were started as ``python -m tinymq`` and ran without them
    (asserts on, no faulthandler to show where a hung worker is)."""
    (project / "app" / "shows_flags.py").write_text(SHOWS_FLAGS)
    options = ["-O", "-X", "faulthandler", "-W", "error::ResourceWarning", "-m", "tinymq"]
    worker = WorkerCLI(project, redis_url, "app.shows_flags:queue", command=options)
    try:
        worker.wait_for(r"^flags: .* in worker$")
        flags = [line for line in worker.log().splitlines() if line.startswith("flags: ")]
        assert flags == [f"flags: optimize=1 faulthandler=True warnings=['error::ResourceWarning'] in {where}"
                         for where in ("check", "worker")]
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.log()
    finally:
        worker.kill()


# --- 5. a hard stop and the processes that jobs started ----------------------------------------

# A job that runs a program (a subprocess of the worker process, in its process group) and waits
# for it: "<pid of the program>" is pushed on the list "programs" once it runs.
RUNS_A_PROGRAM = textwrap.dedent("""
    import subprocess
    from app.shared import queue, record

    @queue.executor("program", timeout=600)
    def run_program(job):
        program = subprocess.Popen(["sleep", "600"])
        record.rpush("programs", program.pid)
        program.wait()
""")


def test_a_hard_stop_kills_the_programs_that_running_jobs_started(shared_project, project, producer, record):
    """A second SIGTERM killed the worker processes but not the programs their jobs ran: those
    ran on, orphaned (a terminal's Ctrl-C no longer reaches them: the worker processes run in
    sessions of their own), while their jobs ran again elsewhere once their leases ran out."""
    (project / "app" / "runs_a_program.py").write_text(RUNS_A_PROGRAM)
    worker = shared_project("app.runs_a_program:queue", "--workers", 1)
    producer.enqueue(tinymq.Job("program", {}))
    _, program = record.blpop(["programs"], timeout=TIMEOUT)
    program = int(program)
    try:
        worker.signal(signal.SIGTERM)
        worker.wait_for(r"stopping \(SIGTERM\)")  # (the worker process waits for its running job)
        worker.signal(signal.SIGTERM)
        worker.wait_for(r"second SIGTERM while stopping: hard stop")
        assert worker.process.wait(TIMEOUT) == 1  # (not worker.wait(): the program, if alive, holds its output)
        eventually(lambda: not alive(program), "the program that the job ran killed")
    finally:
        try:
            os.kill(program, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- 6. the supervisor as a container's PID 1 -----------------------------------------------

# Runs `worker` in this process as a subreaper (what PID 1 is: the orphans of its descendants
# are handed to it), without a container.
SUBREAPER = textwrap.dedent("""
    import ctypes, sys
    PR_SET_CHILD_SUBREAPER = 36
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit(77)  # (the test is skipped)
    from tinymq.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")

# A job that runs a program that leaves a background process behind (as `sh -c "... &"` does):
# that process, orphaned, ends soon after; "<its pid>" is pushed on the list "orphans".
LEAVES_AN_ORPHAN = textwrap.dedent("""
    import subprocess
    from app.shared import queue, record

    @queue.executor("orphan")
    def leave_an_orphan(job):
        shell = subprocess.run(["sh", "-c", "sleep 0.1 & echo $!"], check=True, capture_output=True, text=True)
        record.rpush("orphans", shell.stdout.strip())
""")


def zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_the_supervisor_as_pid_1_reaps_the_orphans_of_the_programs_that_jobs_ran(shared_project, project,
                                                                                   producer, record, redis_url):
    """``CMD ["python", "-m", "tinymq", "worker", ...]`` in a container without an init: the
    processes that the programs of jobs left behind were handed to the supervisor when they
    became orphans, and stayed zombies for ever (one per such job, until no pid was left)."""
    (project / "subreaper.py").write_text(SUBREAPER)
    (project / "app" / "leaves_an_orphan.py").write_text(LEAVES_AN_ORPHAN)
    worker = WorkerCLI(project, redis_url, "app.leaves_an_orphan:queue", "--workers", 1, command=["subreaper.py"])
    try:
        worker.wait_for(r"worker process started")
        if worker.process.poll() == 77:
            pytest.skip("prctl(PR_SET_CHILD_SUBREAPER) is refused here")
        producer.enqueue(tinymq.Job("orphan", {}))
        _, orphan = record.blpop(["orphans"], timeout=TIMEOUT)
        orphan = int(orphan)
        eventually(lambda: not alive(orphan), "the orphan ended")  # (a zombie counts as ended)
        eventually(lambda: not zombie(orphan), "the orphan reaped")
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.log()
    finally:
        worker.kill()
