"""The tensors torchstow hands a collective: aliases of the caller's, waited for at exit.

The multi-process race itself is in tests/distributed/test_exit_status.py; here, with a
view standing for the reference a gloo worker thread keeps, the exit's wait is shown to
end when that holder lets go, and at its limit when it never does.
"""

from __future__ import annotations

import threading
import time

import torch

from torchstow.core.protocol.held_tensors import _Held, aliases


def test_a_collective_writes_through_its_aliases_into_the_callers_tensors() -> None:
    single, parts = torch.zeros(3), [torch.zeros(2), torch.zeros(2)]
    (single_alias, part_aliases), others = aliases((single, parts), {"gather_list": None, "dst": 1})
    single_alias.fill_(1)
    part_aliases[1].fill_(2)
    assert single_alias is not single and all(a is not p for a, p in zip(part_aliases, parts, strict=True))
    assert single.tolist() == [1, 1, 1] and parts[1].tolist() == [2, 2] and parts[0].tolist() == [0, 0]
    assert others == {"gather_list": None, "dst": 1}


def test_the_exit_waits_until_no_other_holder_is_left() -> None:
    held, alias = _Held(), torch.zeros(4)
    held.add([alias])
    holders = [alias.view(-1)]  # holds the alias from C++, as a finished operation does
    threading.Timer(0.2, holders.clear).start()
    start = time.monotonic()
    held.drain(10.0)
    assert 0.2 <= time.monotonic() - start < 10.0
    assert held.tensors == []


def test_the_exit_waits_no_longer_than_its_limit() -> None:
    held, alias = _Held(), torch.zeros(4)
    held.add([alias])
    holder = alias.view(-1)  # never let go, as an operation towards a dead peer
    start = time.monotonic()
    held.drain(0.3)
    assert 0.3 <= time.monotonic() - start < 5.0
    assert len(held.tensors) == 1
    del holder
    held.drain(0.0)
    assert held.tensors == []
