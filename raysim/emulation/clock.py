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
OVER_BUDGET = "over_budget"  # declined before downloading anything: its config exceeds a budget the device states


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
    within: np.ndarray | None = None,
) -> RoundOutcome:
    """Statuses and round duration for one round.

    ``within``: whether each device's config keeps within its budgets (None: no device states one); an
    available device whose config does not is ``over_budget``: it takes no part. Devices that are available,
    within their budgets, fit in memory and do not drop out arrive at
    ``finish_s``; the first ``target`` arrivals (ties by position, i.e. device
    order) within the deadline are aggregated. The round closes at the
    ``target``-th arrival, else at the deadline, else at the last arrival.
    """
    status = np.full(len(finish_s), OK, dtype=object)
    status[~available] = UNAVAILABLE
    takes_part = available if within is None else available & within
    status[available & ~takes_part] = OVER_BUDGET
    status[takes_part & ~fits] = OOM
    status[takes_part & fits & dropped] = DROPPED
    arrives = status == OK
    accepted, duration = settle_rounds(finish_s=finish_s[None], arrives=arrives[None], target=target,
                                       deadline_s=deadline_s)
    status[arrives & ~accepted[0]] = STRAGGLER
    return RoundOutcome(status=status, duration_s=float(duration[0]))


def settle_rounds(
    *, finish_s: np.ndarray, arrives: np.ndarray, target: int, deadline_s: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """The round rule for many alternative rounds at once (one per row of ``finish_s``, shape (rounds, devices)).

    ``arrives`` marks the devices that arrive at all (available, fit, no dropout). Returns which devices are
    aggregated, shape (rounds, devices), and each round's duration, shape (rounds,): what
    :func:`settle_round` decides for one round, which it computes with this.
    """
    rounds, n = finish_s.shape
    in_time = arrives if deadline_s is None else arrives & (finish_s <= deadline_s)
    key = np.where(in_time, finish_s, np.inf)
    order = np.argsort(key, axis=1, kind="stable")  # arrivals by time, ties by position
    place = np.empty_like(order)
    np.put_along_axis(place, order, np.broadcast_to(np.arange(n), (rounds, n)), axis=1)
    accepted = in_time & (place < target)
    count = accepted.sum(axis=1)
    last = np.where(accepted, finish_s, -np.inf).max(axis=1, initial=-np.inf)
    if deadline_s is not None:
        duration = np.where(count == target, last, deadline_s)
    else:
        duration = np.where(count > 0, last, 0.0)
    return accepted, duration.astype(np.float64)
