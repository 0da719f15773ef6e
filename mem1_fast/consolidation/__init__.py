"""Consolidation modes (what the next turn may see), one file each, registered by name; packing.

    from mem1_fast.consolidation import get, pack, MODES, EXACT_MODES
    mode = get("retain")              # mode.layout(traj), mode.kv_plan (None for training-only modes)
    batches = pack(trajs, "recompute", max_tokens=8192)
"""
from . import full, paper, recompute, retain  # noqa: F401  (registration)
from .base import CAUSAL, ConsolidationMode, KVPlan, Layout, LayoutBuilder, get, names, register
from .pack import PackedBatch, pack

MODES: tuple[str, ...] = names()
EXACT_MODES: tuple[str, ...] = names(exact_only=True)

__all__ = ["CAUSAL", "ConsolidationMode", "EXACT_MODES", "KVPlan", "Layout", "LayoutBuilder", "MODES", "PackedBatch",
           "get", "names", "pack", "register"]
