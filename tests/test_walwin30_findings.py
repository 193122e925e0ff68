"""Defects of the SQLite store (session 30), each with its tests.

1. A lock file that already existed, left by an earlier owner, kept the pid of an open refused on
   the file (another program's database): it now names its last owner again.
"""
import os

import pytest

from tinymq import PersistenceError, SQLitePersistence

from _helpers import another_programs_database

# --- 1. a refused open leaves a lock file it found as it was -------------------------------------


def test_a_refused_open_leaves_the_lock_file_it_found_naming_its_last_owner(path):
    another_programs_database(path)
    last_owner = b"12345\n".ljust(32)  # what an owner that exited leaves in it
    fd = os.open(path + "-tinymq.lock", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, last_owner)
    os.close(fd)
    with pytest.raises(PersistenceError, match="is not a tinymq store"):
        SQLitePersistence(path)
    with open(path + "-tinymq.lock", "rb") as f:
        assert f.read() == last_owner
