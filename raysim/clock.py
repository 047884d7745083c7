"""The virtual clock's round rule: who arrives in time, and how long a round lasts.

Production FL (Bonawitz et al., 2019) over-selects devices and closes a round
when the target number of updates has arrived or at a deadline; later
arrivals are stragglers and are discarded. Everything here is computed from
the cost model before any training runs, so straggler training can be skipped
(as FedScale does): its result would be thrown away.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OK, OOM, DROPPED, STRAGGLER, UNAVAILABLE = "ok", "oom", "dropped", "straggler", "unavailable"


@dataclass(frozen=True)
class RoundOutcome:
    status: np.ndarray  # one status string per selected device
    duration_s: float  # virtual seconds from round start to close


def settle_round(
    *,
    finish_s: np.ndarray,
    available: np.ndarray,
    fits: np.ndarray,
    dropped: np.ndarray,
    target: int,
    deadline_s: float | None,
) -> RoundOutcome:
    """Statuses and round duration for one round.

    Devices that are available, fit in memory and do not drop out arrive at
    ``finish_s``; the first ``target`` arrivals (ties by position, i.e. device
    order) within the deadline are aggregated. The round closes at the
    ``target``-th arrival, else at the deadline, else at the last arrival.
    """
    n = len(finish_s)
    status = np.full(n, OK, dtype=object)
    status[~available] = UNAVAILABLE
    status[available & ~fits] = OOM
    status[available & fits & dropped] = DROPPED
    candidates = np.flatnonzero(status == OK)
    order = candidates[np.argsort(finish_s[candidates], kind="stable")]
    in_time = order if deadline_s is None else order[finish_s[order] <= deadline_s]
    accepted = in_time[:target]
    status[np.setdiff1d(candidates, accepted)] = STRAGGLER
    if len(accepted) == target:
        duration = float(finish_s[accepted[-1]])
    elif deadline_s is not None:
        duration = float(deadline_s)
    else:
        duration = float(finish_s[accepted].max()) if len(accepted) else 0.0
    return RoundOutcome(status=status, duration_s=duration)
