"""Which process of a distributed launch this is, from the environment alone (no torch import)."""

from __future__ import annotations

import os

# Set by Lightning's DDP launcher (LOCAL_RANK, NODE_RANK) in the processes it starts, and by torchrun (RANK).
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK")


def is_launched_rank() -> bool:
    """True in a process that a launcher started for a rank other than 0 (it re-runs `qgl train`)."""
    return any(os.environ.get(name, "0") != "0" for name in _RANK_VARIABLES)
