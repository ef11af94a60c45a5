"""Which checkpoint a run keeps (the Trainer's selection policy): early stopping, keep-best and
the starting model as the first candidate, decided here and nowhere else.

A run *picks by validation* when train.early_stopping_patience or checkpoint.keep_best is set:
every validation loss is compared with the best so far. A run from loaded weights that picks by
validation evaluates its starting model at step 0 first, so a fine-tuning that only makes
validation worse keeps the model it started from (docs/RESULTS.md).
"""

from __future__ import annotations

from megatron_pn.config import Config


def selection_settings(cfg: Config) -> list[str]:
    """The keys that make this run pick checkpoints by validation loss (empty: it does not)."""
    return [key for key, on in (
        ("train.early_stopping_patience", cfg.train.early_stopping_patience is not None),
        ("checkpoint.keep_best", cfg.checkpoint.keep_best)) if on]


class Selection:
    def __init__(self, cfg: Config):
        self.patience = cfg.train.early_stopping_patience
        self.keep_best = cfg.checkpoint.keep_best  # save each new best and mark it
        self.picks_by_validation = bool(selection_settings(cfg))
        self.best, self.best_step, self.evals_since_best = float("inf"), None, 0

    def observe(self, step: int, loss: float | None) -> bool:
        """A validation loss at `step`; True when it is the best so far."""
        if loss is None:
            return False
        if loss < self.best:
            self.best, self.best_step, self.evals_since_best = loss, step, 0
            return True
        self.evals_since_best += 1
        return False

    def starting_model_is_candidate(self, step: int, from_loaded_weights: bool) -> bool:
        """Step 0 of a run from loaded weights that picks by validation (and has not yet
        evaluated anything)."""
        return (step == 0 and self.best_step is None and self.picks_by_validation
                and from_loaded_weights)

    def patience_exhausted(self) -> bool:
        return self.patience is not None and self.evals_since_best >= self.patience

    def state_dict(self) -> dict:
        """What a checkpoint keeps (its "early_stopping" entry), so a resumed run goes on."""
        return {"best": self.best, "best_step": self.best_step,
                "evals_since_best": self.evals_since_best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best", self.best)
        self.best_step = state.get("best_step", self.best_step)
        self.evals_since_best = state.get("evals_since_best", self.evals_since_best)
