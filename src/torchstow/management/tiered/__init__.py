"""Tiered checkpoints: every step in a node-local fast tier, replicated over the process
group, persisted to the durable root in the background (see docs/tiered.md)."""

from torchstow.management.tiered.handle import LEVELS, PhaseStats, StepInfo, TieredSave
from torchstow.management.tiered.manager import TieredManager
from torchstow.management.tiered.nodes import expand_node, node_index

__all__ = ["LEVELS", "PhaseStats", "StepInfo", "TieredManager", "TieredSave", "expand_node", "node_index"]
