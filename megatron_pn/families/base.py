"""What a model family supplies, with the plain dense model's answers as the defaults.

A family is stateless: every method takes the run's Config (or what it needs) as an argument.
Importing a family costs nothing (commands' --help use the registry): megatron-core and the
model code are imported by the methods that build or run a model.
"""

from __future__ import annotations

import contextlib
import fnmatch

from megatron_pn.config import Config
from pn_base.errors import require


class ModelFamily:
    name: str = ""
    # Each row of a batch is computed by its cluster's expert: the model's forward takes
    # `cluster_ids`, and held-out windows and batches carry them.
    routed: bool = False
    # pn-project turns a checkpoint of this family into dense experts.
    projectable: bool = False
    # One training job per cluster (`data.expert`), each a run directory of its own.
    per_cluster_jobs: bool = False
    # model keys a checkpoint of the same family must match, beyond the common shape keys
    shape_keys: tuple[str, ...] = ()
    # the shape of a train.eval_sets entry, for the error message
    eval_set_form: str = "[name, prefix]"
    # the Transformer Engine layer spec can build it
    supports_te: bool = True

    # -- configuration -------------------------------------------------------------------------

    def check_config(self, cfg: Config) -> None:
        """Model settings this family cannot run (one ConfigError naming the key)."""
        require(cfg.model.transformer_impl != "transformer_engine" or self.supports_te,
                f"model.transformer_impl transformer_engine: {self.name} layers extend the local "
                f"spec; use local (or auto) for model.type {self.name}")

    def check_data(self, cfg: Config, blend) -> None:
        """The training blend fits the family (e.g. it names each dataset's cluster)."""

    def data_warnings(self, cfg: Config, blend) -> list[str]:
        """What the run will do with this blend that a user may not mean."""
        return []

    def check_eval_set(self, cfg: Config, entry) -> None:
        """One train.eval_sets entry: [name, prefix] for a model that is not routed."""
        require(isinstance(entry, (list, tuple)) and len(entry) == 2,
                f"train.eval_sets: {entry!r} should be {self.eval_set_form}")

    def job_config(self, cfg: Config) -> Config:
        """The config of the job this process runs (SLM-mix: one expert's)."""
        return cfg

    # -- the model -----------------------------------------------------------------------------

    def decoder_spec(self, cfg: Config, tconfig, vp_stage: int | None):
        """The decoder of one (virtual) pipeline stage: a layer spec or a block spec."""
        raise NotImplementedError

    def model_class(self, cfg: Config) -> tuple[type, dict]:
        """The GPTModel class and its extra constructor arguments."""
        from megatron.core.models.gpt import GPTModel

        return GPTModel, {}

    def expert_parameters(self, chunks: list, total: int) -> int | None:
        """Parameters of the model one expert is at inference, of the model's `total` (None:
        not an expert model)."""
        return None

    # -- training ------------------------------------------------------------------------------

    def routing_table(self, cfg: Config):
        """What turns a batch's `dataset_id` into cluster ids (None: batches are not routed)."""
        return None

    def batch_routing(self, batch: dict, table) -> dict:
        """Extra keyword arguments of the model's forward for this micro-batch."""
        return {}

    def step_experts(self, batches: list[dict], table) -> tuple:
        """The experts an optimizer step uses (known before its first micro-batch)."""
        return ()

    def step_scope(self, cfg: Config, model_chunks):
        """A context around one optimizer step's micro-batches, given the step's experts."""
        return lambda experts: contextlib.nullcontext()

    def eval_scope(self, model_chunks):
        """A context around one evaluation's forward passes."""
        return contextlib.nullcontext()

    def finalize_grads(self, model_chunks, num_tokens=None, **kwargs) -> None:
        """megatron-core's gradient finalization after the step's backward passes (DP
        reduction, tied embeddings, token scaling): its DDP's `finalize_model_grads_func`."""
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads(model_chunks, num_tokens, **kwargs)

    def lr_overrides(self, train) -> dict[str, dict]:
        """Parameter-name globs -> their own LR schedule ({max_lr, min_lr}); both engines build
        their parameter groups from this."""
        return {}

    def lr_override(self, name: str, train) -> dict | None:
        """The LR override of one parameter name (DeepSpeed's groups), or None."""
        for pattern, schedule in self.lr_overrides(train).items():
            if fnmatch.fnmatchcase(name, pattern):
                return schedule
        return None

    # -- evaluation, projection, export --------------------------------------------------------

    def route_held_out(self, cfg: Config, held, route: list, window_clusters) -> None:
        """Route a train.eval_sets set (its optional third entry): nothing for a dense model."""

    def dense_state(self, model, expert: int | None) -> dict:
        """The state dict of the dense model to export (a PN: that of expert `expert`)."""
        return model.state_dict()
