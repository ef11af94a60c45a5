"""Which checkpoint a run keeps (the Trainer's selection policy): early stopping, keep-best and
the starting model as the first candidate, decided here and nowhere else.

A run *picks by validation* when train.early_stopping_patience or checkpoint.keep_best is set:
every validation is compared with the best so far. A run from loaded weights that picks by
validation evaluates its starting model at step 0 first, so a fine-tuning that only makes
validation worse keeps the model it started from (docs/RESULTS.md).

Every validation scores the same fixed windows (training/validation.py), so two evaluations
differ by the model only, and a candidate replaces the best only when it beats it by more than
train.selection_margin: by default the noise of that comparison, so a lucky evaluation does not
move the best (docs/RESULTS.md: fine-tunings that ended worse on test than where they started).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from megatron_pn.config import Config
from megatron_pn.costs import mean_and_stderr
from pn_base.errors import ConfigError, UserError


@dataclass
class Scores:
    """One validation: the NLL sum and the tokens of every window, and what names the windows
    (`windows`: the selection compares scores of the same windows only)."""
    sums: np.ndarray  # float64 [W]
    sizes: np.ndarray  # tokens [W]
    windows: str

    @property
    def nll(self) -> float:
        return mean_and_stderr(self.sums, self.sizes)[0]

    @property
    def stderr(self) -> float | None:
        return mean_and_stderr(self.sums, self.sizes)[1]


def selection_settings(cfg: Config) -> list[str]:
    """The keys that make this run pick checkpoints by validation loss (empty: it does not)."""
    return [key for key, on in (
        ("train.early_stopping_patience", cfg.train.early_stopping_patience is not None),
        ("checkpoint.keep_best", cfg.checkpoint.keep_best)) if on]


def selection_margin(text: str) -> float | None:
    """train.selection_margin in nats, None for auto; anything else is a ConfigError."""
    if text == "auto":
        return None
    try:
        margin = float(text)
    except ValueError:
        margin = math.nan
    if not margin >= 0 or math.isinf(margin):
        raise ConfigError(f"train.selection_margin: must be auto or a number of nats >= 0, "
                          f"got {text}")
    return margin


class Selection:
    def __init__(self, cfg: Config):
        self.patience = cfg.train.early_stopping_patience
        self.keep_best = cfg.checkpoint.keep_best  # save each new best and mark it
        self.picks_by_validation = bool(selection_settings(cfg))
        self.margin = selection_margin(cfg.train.selection_margin)
        self.best, self.best_step, self.evals_since_best = float("inf"), None, 0
        self.best_sums, self.windows = None, None  # the best's window sums, what names them

    def observe(self, step: int, scores: Scores | None) -> bool:
        """A validation at `step`; True when it replaces the best."""
        if scores is None:
            return False
        if self.replaces_best(scores):
            self.best, self.best_step, self.evals_since_best = scores.nll, step, 0
            self.best_sums, self.windows = scores.sums.copy(), scores.windows
            return True
        self.evals_since_best += 1
        return False

    def replaces_best(self, scores: Scores) -> bool:
        if self.best_sums is None:  # the first one (or a best an older version scored)
            return True
        if scores.windows != self.windows:
            raise UserError("validation scores other windows than the best so far was scored "
                            "on (train.valid_tokens or the validation data changed since the "
                            "checkpoint) — resume with the run's settings, or start a new "
                            "checkpoint.dir")
        return self.best - scores.nll > self.margin_over_best(scores)

    def margin_over_best(self, scores: Scores) -> float:
        """train.selection_margin, or (auto) the standard error of the candidate's per-token
        difference to the best: paired, from the per-window differences of NLL sums on the same
        windows (what the windows share cancels). 0 from fewer than two windows."""
        if self.margin is not None:
            return self.margin
        return mean_and_stderr(scores.sums - self.best_sums, scores.sizes)[1] or 0.0

    def starting_model_is_candidate(self, step: int, from_loaded_weights: bool) -> bool:
        """Step 0 of a run from loaded weights that picks by validation (and has not yet
        evaluated anything)."""
        return (step == 0 and self.best_step is None and self.picks_by_validation
                and from_loaded_weights)

    def patience_exhausted(self) -> bool:
        return self.patience is not None and self.evals_since_best >= self.patience

    def state_dict(self) -> dict:
        """What a checkpoint keeps (its "early_stopping" entry), so a resumed run goes on
        deciding exactly as an uninterrupted one (the best's window sums as exact floats)."""
        return {"best": self.best, "best_step": self.best_step,
                "evals_since_best": self.evals_since_best, "windows": self.windows,
                "best_sums": None if self.best_sums is None else self.best_sums.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best", self.best)
        self.best_step = state.get("best_step", self.best_step)
        self.evals_since_best = state.get("evals_since_best", self.evals_since_best)
        self.windows = state.get("windows")
        sums = state.get("best_sums")
        self.best_sums = None if sums is None else np.array(sums, dtype=np.float64)
