"""Which process may write files: under several processes (DDP, torchrun, SLURM) only global rank 0."""

from __future__ import annotations


def global_rank() -> int:
    """This process's global rank: Lightning's once a Trainer has set it up, else from the launcher's environment.

    Lightning's ``rank_zero_only.rank`` is read from RANK, LOCAL_RANK (its own subprocess launcher)
    or SLURM_PROCID at import, and updated when a Trainer starts its processes.
    """
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def is_global_zero() -> bool:
    return global_rank() == 0
