"""Callbacks: what watches a run, round by round (as pfl-research's callbacks).

Each round's :class:`~raysim.io.results.RoundResult` passes through the run's
callbacks in order. A callback may add metrics to the round's row (later
callbacks see them), ask the run to stop with a status, and contribute to
``summary.json``. Evaluation, the accuracy target, the privacy budget, the
files, the policy's feedback and the progress bar are callbacks; so is
anything a user adds (``run_experiment(cfg, callbacks=[...])``: the seam for
experiment tracking).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from raysim.io.results import RoundResult, RunWriter

if TYPE_CHECKING:
    from raysim.engine.run import Run

EVAL_COLUMNS = ("eval_loss", "eval_perplexity", "eval_accuracy", "eval_top3_accuracy", "emulator_eval_loss",
                "emulator_eval_accuracy")


@dataclass(frozen=True)
class Stop:
    """Ask the run to stop after this round with ``status`` (summary.json); ``message`` says why."""

    status: str
    message: str


@dataclass(frozen=True)
class Step:
    """A callback's answer to a round: metrics for the row, and whether to stop."""

    metrics: dict[str, float] = field(default_factory=dict)
    stop: Stop | None = None


class Callback:
    """The hooks of a callback; each does nothing unless overridden."""

    def on_start(self, run: Run) -> None:
        """Before the first round (round 1, or the one after a resumed run's checkpoint)."""

    def after_round(self, run: Run, result: RoundResult) -> Step:
        return Step()

    def after_record(self, run: Run) -> None:
        """Once the run has recorded the round (its totals, time, ε are the round's)."""

    def summary(self, run: Run) -> dict:
        """This callback's part of ``summary.json``."""
        return {}

    def before_end(self, run: Run) -> None:
        """The run is stopping (after the last round, or failed or interrupted): last work on its state, before
        the final summary is taken (the last checkpoint)."""

    def on_end(self, run: Run, summary: dict) -> None:
        """After the last round, or on the way out of a failed or interrupted one, with the final summary."""

    def state(self) -> dict:
        """What this callback carries from round to round (JSON), for checkpoints."""
        return {}

    def load_state(self, state: dict) -> None:
        """Continue from a checkpoint's :meth:`state`."""


class Evaluation(Callback):
    """Held-out metrics before round 1, every ``eval.every`` rounds and after the last one."""

    def __init__(self, *, every: int, last_round: int):
        self.every, self.last_round = every, last_round
        self.initial: dict[str, float] = {}

    def on_start(self, run: Run) -> None:
        if self.every > 0 and run.completed == 0:  # a resumed run has its initial metrics from the checkpoint
            self.initial = run.pool.evaluate(run.state_ref)

    def after_round(self, run: Run, result: RoundResult) -> Step:
        r = result.row.round
        if self.every > 0 and (r % self.every == 0 or r == self.last_round):
            return Step(metrics=run.pool.evaluate(run.state_ref))
        return Step()

    def summary(self, run: Run) -> dict:
        return {"initial": self.initial}

    def state(self) -> dict:
        return {"initial": self.initial}

    def load_state(self, state: dict) -> None:
        self.initial = state.get("initial", {})


class TargetAccuracy(Callback):
    """The virtual time an evaluation first reaches ``eval.target_accuracy``; with ``stop``, the run ends there."""

    def __init__(self, *, target: float | None, stop: bool):
        self.target, self.stop = target, stop
        self.reached_s: float | None = None

    def after_round(self, run: Run, result: RoundResult) -> Step:
        row = result.row
        if self.target is None or self.reached_s is not None or not row.eval_accuracy >= self.target:
            return Step()
        self.reached_s = row.sim_time_s
        if not self.stop:
            return Step()
        return Step(stop=Stop("target_reached", f"stopped after round {row.round}: eval accuracy "
                                                f"{row.eval_accuracy:.4f} reached eval.target_accuracy="
                                                f"{self.target:g} at {row.sim_time_s:.1f} virtual s"))

    def summary(self, run: Run) -> dict:
        return {"time_to_target_s": self.reached_s, "target_accuracy": self.target}

    def state(self) -> dict:
        return {"reached_s": self.reached_s}

    def load_state(self, state: dict) -> None:
        self.reached_s = state["reached_s"]


class PrivacyBudget(Callback):
    """Stops the run after the last round within ``privacy.max_epsilon`` (the plan fixed it before round 1)."""

    def __init__(self, *, last_round: int, rounds: int, max_epsilon: float | None):
        self.last_round, self.rounds, self.max_epsilon = last_round, rounds, max_epsilon

    def after_round(self, run: Run, result: RoundResult) -> Step:
        row = result.row
        if row.round < self.last_round or self.last_round == self.rounds:
            return Step()
        return Step(stop=Stop("privacy_budget_spent", f"stopped after round {row.round}: one more round would "
                                                      f"spend more than privacy.max_epsilon={self.max_epsilon:g} "
                                                      f"(ε = {row.epsilon:.4g} at δ = {row.delta:g})"))


class OffSupportUpdate(RuntimeError):
    """Devices sent something where central DP adds no noise: a method's map-back and its support disagree."""


class ReleaseCheck(Callback):
    """Under central DP: fails the run once a round is recorded whose devices sent anything outside the noised
    coordinates (``off_support_norm`` not exactly 0.0, NaN included).

    The server released none of it (it releases the support only), but a method and its support disagree, so
    whatever the run claims about that method rests on a bug. The round stays in the files as the evidence;
    the run ends ``failed`` with this cause.
    """

    def __init__(self):
        self.failure: str | None = None

    def after_round(self, run: Run, result: RoundResult) -> Step:
        row = result.row
        if row.off_support_norm != 0.0:
            self.failure = (f"round {row.round}: devices sent updates of L2 norm {row.off_support_norm:.6g} outside "
                            f"the coordinates central DP noises (discarded, not released): a method's map-back "
                            f"and its support disagree")
        return Step()

    def after_record(self, run: Run) -> None:
        if self.failure is not None:
            raise OffSupportUpdate(self.failure)


class Files(Callback):
    """rounds.parquet and devices.parquet, a part per round; summary.json from the start (``status: running``),
    kept current after every round and final at the end."""

    def __init__(self, writer: RunWriter):
        self.writer = writer

    def on_start(self, run: Run) -> None:
        self.writer.write_summary(run.summary())

    def after_round(self, run: Run, result: RoundResult) -> Step:
        stamped = result.with_metrics({"wall_time_s": time.perf_counter() - result.started_s})
        self.writer.write_round(stamped)
        return Step(metrics={"wall_time_s": stamped.row.wall_time_s})

    def after_record(self, run: Run) -> None:
        self.writer.write_summary(run.summary())

    def on_end(self, run: Run, summary: dict) -> None:
        self.writer.write_summary(summary)


class Checkpoints(Callback):
    """The run's whole state every ``every`` rounds (and where it stops), to resume from
    (:mod:`raysim.io.checkpoint`); 0: only where it stops."""

    def __init__(self, *, every: int):
        self.every = every
        self.saved = 0  # the round of the last checkpoint written
        self.seconds = 0.0  # wall time spent writing them

    def on_start(self, run: Run) -> None:
        self.saved = run.completed

    def after_record(self, run: Run) -> None:
        if self.every > 0 and run.completed % self.every == 0:
            self._save(run)

    def before_end(self, run: Run) -> None:
        if run.completed > self.saved:
            self._save(run)

    def summary(self, run: Run) -> dict:
        return {"checkpoint": {"round": self.saved, "wall_time_s": self.seconds}}

    def _save(self, run: Run) -> None:
        start = time.perf_counter()
        if run.save_checkpoint():
            self.saved = run.completed
        self.seconds += time.perf_counter() - start


class PolicyFeedback(Callback):
    """The policy learns from the round's results."""

    def after_round(self, run: Run, result: RoundResult) -> Step:
        run.policy.observe(result)
        return Step()


class Progress(Callback):
    """One bar: rounds, virtual time, losses, how many devices made it, and ε under central DP."""

    def __init__(self, *, rounds: int, enabled: bool, private: bool):
        self.rounds, self.enabled, self.private = rounds, enabled, private
        self.bar: tqdm | None = None

    def on_start(self, run: Run) -> None:
        self.bar = tqdm(total=self.rounds, initial=run.completed, disable=not self.enabled, file=sys.stderr,
                        unit="round", dynamic_ncols=True)

    def after_round(self, run: Run, result: RoundResult) -> Step:
        row = result.row
        eval_loss = row.eval_loss if not math.isnan(row.eval_loss) else run.last.get("eval_loss", math.nan)
        self.bar.set_postfix_str(
            f"sim {row.sim_time_s / 3600:.2f}h loss {row.train_loss:.3f} eval {eval_loss:.3f} "
            f"ok {row.n_completed}/{row.n_selected}" + (f" ε {row.epsilon:.3g}" if self.private else ""), refresh=False)
        self.bar.update()
        return Step()

    def on_end(self, run: Run, summary: dict) -> None:
        if self.bar is not None:
            self.bar.close()
