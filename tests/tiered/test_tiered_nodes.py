"""Making a tiered manager on real gloo ranks: what each rank must share with its node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from persist_scenarios import one_node_index_on_two_hosts


@pytest.mark.slow
def test_one_node_index_on_two_hosts_is_refused_on_every_rank(pools: Any, tmp_path: Path) -> None:
    # Launched without torchrun every rank was node 0: only rank 0 published manifests and
    # pruned, in its own host's fast tier, so a restore never found a step whole and the
    # other host's fast tier filled up, while every save reported its levels reached.
    said = pools(2).run(one_node_index_on_two_hosts, str(tmp_path / "root"), str(tmp_path / "fast"))
    assert len(set(said)) == 1, said  # the same refusal on both ranks
    assert "rank 1 and rank 0 both say they are node 0" in said[0] and "TORCHSTOW_NODE" in said[0]
