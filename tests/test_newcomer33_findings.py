"""Findings of a newcomer (session 33) who follows README.md on fresh 3.9 and 3.13 venvs and checks
docs/api.md and docs/persistence.md against the code."""
import pickle
import warnings

import pytest

import tinymq
from tinymq import Job, Queue
from tinymq.persistence import PickleSerializer


def _pickle_serializer(protocol):  # the opt-in's UserWarning is not what these tests look at
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return PickleSerializer(protocol=protocol)


# --- PickleSerializer(protocol=...) ---------------------------------------------------------------

# Fixed: PickleSerializer(protocol=99) (or "5", or 2.0) was taken as it was, and every save then
# failed: each enqueue raised PersistenceError naming the job, never the bad protocol where it
# came in. It is refused at construction now, naming it.


@pytest.mark.parametrize("protocol, error", [
    (pickle.HIGHEST_PROTOCOL + 1, ValueError),
    (99, ValueError),
    ("5", TypeError),
    (2.0, TypeError),
    (True, TypeError),
])
def test_a_pickle_protocol_pickle_cannot_write_is_refused_where_it_comes_in(protocol, error):
    with pytest.raises(error, match="protocol") as raised:
        _pickle_serializer(protocol)
    assert repr(protocol) in str(raised.value)


@pytest.mark.parametrize("protocol", [None, -1, 0, 2, pickle.HIGHEST_PROTOCOL])
def test_every_protocol_pickle_takes_still_works(protocol, tmp_path):
    serializer = _pickle_serializer(protocol)
    payload = {"a": (1, 2), 3: {"b"}}
    assert serializer.loads(serializer.dumps(payload)) == payload
    with tinymq.SQLitePersistence(str(tmp_path / "jobs.db"), serializer=serializer) as store:
        with Queue(10) as q:
            q.set_persistence(store)
            q.enqueue(Job("a", payload, id="one"))
        assert [job.payload for job in store.jobs()] == [payload]


class _Index:
    """An integer as pickle takes one that is not an int: a numpy integer, say (``__index__``)."""

    def __init__(self, value):
        self.value = value

    def __index__(self):
        return self.value

    def __repr__(self):
        return f"_Index({self.value})"


# Fixed (review33): the check above refused what is not an int, though pickle takes any integer with
# __index__ (numpy.int64(4) as protocol worked before it): TypeError where pickle writes fine.
def test_a_protocol_given_as_an_index_integer_is_taken_as_pickle_takes_it():
    serializer = _pickle_serializer(_Index(2))
    assert serializer.dumps(1)[:2] == b"\x80\x02"  # protocol 2's header
    assert repr(serializer) == "PickleSerializer(protocol=2)"
    with pytest.raises(ValueError, match=r"_Index\(99\)"):
        _pickle_serializer(_Index(99))
