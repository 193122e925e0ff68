"""Defects found by attack28a (session 28: the durability of the SQLite store and its command
line, attacked from outside), each with its test.
"""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import tinymq
from tinymq import Job, SQLitePersistence

ROOT = Path(tinymq.__file__).resolve().parent.parent
TIMEOUT = 60  # seconds for one command: each returns in well under one


def cli(*args):
    """``python -m tinymq *args`` as a user runs it; the finished process (text output)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "tinymq", *map(str, args)], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TIMEOUT)


# --- 1. requeue-dead / purge-dead of a job the default serializer cannot decode -------------

# `requeue-dead --db FILE ID` checked its ids against dead_jobs(), which leaves out a row the
# command's JSON serializer cannot decode (a store written with PickleSerializer): a dead job in
# the file was refused as "no dead job with id 'd1' ... nothing changed", while `--all` requeued
# it. docs/cli.md: only "an id that is not a dead job in the file is an error".
@pytest.mark.parametrize("command, done", [("requeue-dead", "requeued 1 dead job"), ("purge-dead", "purged 1 dead job")])
def test_requeue_and_purge_dead_by_id_take_a_dead_job_json_cannot_decode(tmp_path, command, done):
    from tinymq.persistence import PickleSerializer

    path = tmp_path / "jobs.db"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PickleSerializer's warning
        serializer = PickleSerializer()
    with SQLitePersistence(path, serializer=serializer) as store:
        job = Job("t", {1, 2}, id="d1")  # a set: pickle only
        store.save(job)
        store.mark_dead(job, "retries_exhausted", "boom")
    result = cli(command, "--db", path, "d1")
    assert result.returncode == 0 and result.stdout.startswith(done), (result.stdout, result.stderr)
    result = cli(command, "--db", path, "d2")  # an id no dead job has is still an error
    assert result.returncode == 1 and "no dead job with id 'd2'" in result.stderr
    with SQLitePersistence(path, serializer=serializer, read_only=True) as view:
        assert view.dead_jobs() == []
        assert [job.id for job in view.jobs()] == (["d1"] if command == "requeue-dead" else [])
