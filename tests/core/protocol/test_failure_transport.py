"""Exceptions cross ranks intact where they can, and as a clear stand-in where they cannot."""

from __future__ import annotations

import pickle
import sys
import threading
import traceback
import types

import pytest
import torch

import torchstow
import torchstow.planning
from torchstow.core.protocol.failures import CapturedFailure, capture, pack, unpack
from torchstow.errors import CheckpointException


def _raise(exc: BaseException) -> None:
    raise exc


def _travel(exc: BaseException) -> CapturedFailure:
    failure = capture(lambda: _raise(exc))
    assert isinstance(failure, CapturedFailure)
    data, problem = pack(failure)
    assert problem is None
    arrived = unpack(data)
    assert isinstance(arrived, CapturedFailure)
    return arrived


class NeedsTwoArgsError(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a} and {b}")


def test_a_picklable_exception_arrives_as_itself_with_its_stack() -> None:
    arrived = _travel(ValueError("bad shape"))
    assert type(arrived.exc) is ValueError
    assert str(arrived.exc) == "bad shape"
    assert [frame.name for frame in arrived.stack][-1] == "_raise"


def test_an_exception_that_cannot_be_pickled_arrives_as_a_remote_error() -> None:
    class LocalError(Exception):
        pass

    arrived = _travel(LocalError("only here"))
    assert isinstance(arrived.exc, torchstow.RemoteError)
    assert arrived.exc.type_name.endswith(
        "test_an_exception_that_cannot_be_pickled_arrives_as_a_remote_error.<locals>.LocalError"
    )
    assert arrived.exc.message == "only here"
    assert "raise exc" in arrived.exc.remote_traceback
    assert str(arrived.exc) == f"{arrived.exc.type_name}: only here"


def test_an_exception_that_pickles_but_does_not_unpickle_arrives_as_a_remote_error() -> None:
    arrived = _travel(NeedsTwoArgsError(1, 2))
    assert isinstance(arrived.exc, torchstow.RemoteError)
    assert arrived.exc.message == "1 and 2"


def test_an_exception_whose_module_the_receiver_lacks_arrives_as_a_remote_error() -> None:
    module = types.ModuleType("only_on_the_sender")
    exec("class SenderError(Exception):\n    pass\n", module.__dict__)
    sys.modules["only_on_the_sender"] = module
    try:
        failure = capture(lambda: _raise(module.SenderError("from afar")))
        data, _ = pack(failure)
    finally:
        del sys.modules["only_on_the_sender"]
    arrived = unpack(data)
    assert isinstance(arrived.exc, torchstow.RemoteError)
    assert arrived.exc.type_name == "only_on_the_sender.SenderError"
    assert arrived.exc.message == "from afar"


def test_a_value_that_cannot_be_pickled_becomes_a_failure() -> None:
    data, problem = pack({"plan": threading.Lock()})
    assert isinstance(problem, CapturedFailure)
    assert isinstance(problem.exc, TypeError)
    assert isinstance(unpack(data).exc, TypeError)
    assert isinstance(unpack(b"not a pickle"), CapturedFailure)


def test_remote_errors_do_not_specialise_the_checkpoint_exception() -> None:
    stack = traceback.StackSummary.from_list([])
    error = CheckpointException.from_failures("save write", {1: (torchstow.RemoteError("X", "y"), stack)})
    assert type(error) is CheckpointException
    assert "rank 1: RemoteError: X: y" in str(error)


def test_timeout_error_is_a_checkpoint_exception_and_a_timeout() -> None:
    error = torchstow.CheckpointTimeoutError("lost contact", rank=2, step="save write")
    assert isinstance(error, torchstow.CheckpointException)
    assert isinstance(error, TimeoutError)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.rank, copy.step, copy.failures) == (
        torchstow.CheckpointTimeoutError,
        "lost contact",
        2,
        "save write",
        {},
    )


@pytest.mark.parametrize("timeout", [0, -1.0, "10", True])
def test_bad_timeouts_are_rejected(tmp_path: object, timeout: object) -> None:
    with pytest.raises((ValueError, TypeError), match="timeout must be"):
        torchstow.save({"a": 1}, f"{tmp_path}/c", timeout=timeout)  # type: ignore[arg-type]


class BrokenStrError(Exception):
    def __str__(self) -> str:
        return self.detail  # type: ignore[attr-defined, no-any-return]  # never set: raises


def test_an_exception_whose_str_raises_is_still_the_failure_reported(tmp_path: object) -> None:
    class Planner(torchstow.planning.DefaultSavePlanner):
        def create_local_plan(self) -> object:
            raise BrokenStrError()

    with pytest.raises(CheckpointException) as info:
        torchstow.save({"w": torch.ones(2)}, f"{tmp_path}/c", planner=Planner())
    # Before: the AttributeError of its __str__, raised while building the message, instead.
    assert type(info.value.failures[0][0]) is BrokenStrError
    assert "rank 0: BrokenStrError: BrokenStrError()" in str(info.value)


def test_a_huge_message_travels_whole_in_the_exception_and_cut_in_its_description() -> None:
    class LocalError(Exception):  # cannot be pickled: arrives as its description
        pass

    large = "x" * (200 << 10)
    assert str(_travel(RuntimeError(large)).exc) == large
    arrived = _travel(LocalError(large))
    assert isinstance(arrived.exc, torchstow.RemoteError)
    assert arrived.exc.message == "x" * (64 << 10) + f"... ({(200 - 64) << 10} more characters)"
