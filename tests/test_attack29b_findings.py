"""Defects found by an outside attack (session 29) on the last session's join(), writable Job.id,
counters that never go down, lost Redis hashes and the SQLite store's serializer record."""
import logging
import warnings

import pytest

from tinymq import Job, PersistenceError, SQLitePersistence
from tinymq.persistence import PickleSerializer


def pickle_serializer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its warning about loading untrusted files
        return PickleSerializer()


# --- a read-only look opened before the file held a job --------------------------------------------

# A read-only store checked the file's serializer record only when it was opened. Opened with another
# serializer while the file held no job (allowed: nothing to misread), it went on reading after the
# owner had saved jobs, and misread each one: jobs() said [] and logged every job as a row that cannot
# be decoded. Each look now refuses, as opening the file then would.
@pytest.mark.parametrize("look", ["jobs", "dead_jobs", "counts", "quarantined"])
def test_a_read_only_look_opened_on_an_empty_file_refuses_once_it_holds_jobs_of_another_serializer(
        path, caplog, look):
    with SQLitePersistence(path) as owner, \
            SQLitePersistence(path, read_only=True, serializer=pickle_serializer()) as view:
        assert view.jobs() == []
        owner.save(Job("t", {"x": 1}, id="a"))
        with caplog.at_level(logging.ERROR, logger="tinymq"):
            with pytest.raises(PersistenceError, match=r"written with the serializer .*JSONSerializer.*given "
                                                       r".*PickleSerializer"):
                getattr(view, look)()
        assert not caplog.records  # no job read as undecodable
        assert [job.id for job in SQLitePersistence(path, read_only=True).jobs()] == ["a"]
