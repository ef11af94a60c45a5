"""What a model family supplies, with the plain dense model's answers as the defaults.

A family is stateless: every method takes the run's Config (or what it needs) as an argument.
Importing a family costs nothing (commands' --help use the registry): megatron-core and the
model code are imported by the methods that build or run a model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch

from megatron_pn.config import Config, FinetuneConfig
from pn_base.errors import require


def dense_model_config(model):
    """A model section as a plain dense model of the same shape: no experts, banks or codes."""
    return dataclasses.replace(model, type="dense", num_experts=0, bank_size=0, code_size=0,
                               project_attention=False)


def one_hot(index: int, k: int) -> list[float]:
    """The cluster weights of one expert (cluster `index` of k)."""
    if not 0 <= index < k:
        raise ValueError(f"expert {index} is outside [0, {k})")
    return [float(i == index) for i in range(k)]


class ModelFamily:
    name: str = ""
    # Each row of a batch is computed with its cluster's parameters (a PN's expert, SLM-cond's
    # vector): the model's forward takes `cluster_ids`; held-out windows and batches carry them.
    routed: bool = False
    # pn-project turns a checkpoint of this family into a dense model per cluster (or mixture).
    projectable: bool = False
    # One training job per cluster (`data.expert`), each a run directory of its own.
    per_cluster_jobs: bool = False
    # model keys a checkpoint of the same family must match, beyond the common shape keys
    shape_keys: tuple[str, ...] = ()
    # the shape of a train.eval_sets entry, for the error message
    eval_set_form: str = "[name, prefix]"
    # the Transformer Engine layer spec can build it
    supports_te: bool = True
    # data.mixture: its forward takes `mixture`, k cluster weights that compute every row
    mixture_trainable: bool = False
    # finetune.lora: its layers are megatron-core's dense linears, which get adapters
    takes_lora: bool = False

    # -- configuration -------------------------------------------------------------------------

    def check_config(self, cfg: Config) -> None:
        """Model settings this family cannot run (one ConfigError naming the key)."""
        require(cfg.model.transformer_impl != "transformer_engine" or self.supports_te,
                f"model.transformer_impl transformer_engine: {self.name} layers extend the local "
                f"spec; use local (or auto) for model.type {self.name}")
        require(cfg.data.mixture == "none" or self.mixture_trainable,
                f"data.mixture {cfg.data.mixture}: mixture training is for model.type pn, not "
                f"{self.name}; set data.mixture=none")
        require(cfg.data.mixture == "none" or not cfg.data.group_by_cluster,
                "data.group_by_cluster: a mixture micro-batch has one code already; set "
                "data.group_by_cluster=false with data.mixture")

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

    def step_scope(self, cfg: Config, model_chunks, late_gradients: bool):
        """A context around one optimizer step's micro-batches, given the step's experts and
        its number of micro-batches (keywords `experts`, `micro_batches`). `late_gradients`:
        the engine sums a parameter's gradient right when its first one of the step comes in a
        later micro-batch than the first."""
        return lambda **step: contextlib.nullcontext()

    def compute_note(self, cfg: Config, late_gradients: bool, device_type: str,
                     dtype) -> str | None:
        """A start-up line on how this model computes where that depends on the engine or the
        device (None: nothing to say)."""
        return None

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

    def dense_config(self, model):
        """The model section of the dense model an instance of this family becomes (pn-project,
        pn-export-hf): a dense model is itself."""
        return model

    def dense_run_config(self, cfg: Config) -> Config:
        """The config a dense model made from this family's checkpoint records (pn-project,
        pn-merge-lora): the dense model, its data no longer drawn as cluster mixtures, no LoRA
        adapters (merged into its weights)."""
        import dataclasses

        return dataclasses.replace(cfg, model=self.dense_config(cfg.model),
                                   data=dataclasses.replace(cfg.data, mixture="none"),
                                   finetune=FinetuneConfig())

    def dense_state(self, model, weights=None) -> dict:
        """The state dict of that dense model. `weights` (length k, summing to 1) mixes the
        clusters of a routed family: one-hot for one expert, a spec set's histogram for a
        mixture; a dense model takes none."""
        return model.state_dict()


class RoutedFamily(ModelFamily):
    """A family whose every row is computed with its cluster's parameters (model.num_experts =
    k clusters): batches carry each row's cluster id from the per-cluster blend of `pn-data
    cluster`, held-out windows theirs (an assign dir) or one expert's, and pn-project makes a
    dense model of one cluster (or a mixture of them)."""

    routed = True
    projectable = True
    eval_set_form = "[name, prefix, expert or assign dir]"

    def dense_config(self, model):
        return dense_model_config(model)

    def check_config(self, cfg: Config) -> None:
        super().check_config(cfg)
        m = cfg.model
        require(m.num_experts >= 1,
                f"model.num_experts must be >= 1 for model.type {self.name}, got {m.num_experts}")
        require(not cfg.parallel.sequence_parallel,
                f"model.type {self.name} does not support sequence_parallel")

    def check_data(self, cfg: Config, blend) -> None:
        require(blend.cluster_ids is not None,
                f"model.type {self.name} needs the cluster id of every training sequence: set "
                "data.blend_file to the generic_blend.json of `pn-data cluster` (or list "
                "per-cluster prefixes in data.blend with data.cluster_ids)")
        require(not cfg.data.valid_blend,
                f"data.valid_blend: not supported for model.type {self.name} (validation uses "
                "data.split of the per-cluster datasets)")
        bad = [c for c in blend.cluster_ids if not 0 <= c < cfg.model.num_experts]
        require(not bad, f"data.cluster_ids: {bad[:5]} outside [0, model.num_experts = "
                         f"{cfg.model.num_experts})")

    def data_warnings(self, cfg: Config, blend) -> list[str]:
        """Experts whose cluster has no (weighted) dataset in the blend train on nothing."""
        if blend.cluster_ids is None:
            return []
        weights = blend.weights or [1.0] * len(blend.prefixes)
        fed = {c for c, w in zip(blend.cluster_ids, weights) if w > 0}
        idle = [e for e in range(cfg.model.num_experts) if e not in fed]
        if not idle:
            return []
        shown = ", ".join(map(str, idle[:20])) + (", ..." if len(idle) > 20 else "")
        return [f"expert{'s' if len(idle) > 1 else ''} {shown} of model.num_experts "
                f"{cfg.model.num_experts} get{'' if len(idle) > 1 else 's'} no training data "
                "from the blend (data.blend_file / data.cluster_ids): trained on nothing, "
                "keeping their initial parameters — lower model.num_experts or add the "
                "clusters' data unless that is what you mean"]

    def check_eval_set(self, cfg: Config, entry) -> None:
        require(isinstance(entry, (list, tuple)) and len(entry) == 3,
                f"train.eval_sets: {entry!r} should be {self.eval_set_form}")
        if not isinstance(entry[2], str):
            require(isinstance(entry[2], int) and 0 <= entry[2] < cfg.model.num_experts,
                    f"train.eval_sets: expert {entry[2]!r} of {entry[0]} outside "
                    f"[0, model.num_experts = {cfg.model.num_experts})")

    def routing_table(self, cfg: Config):
        """The cluster of each blend entry (a tensor: a sample's `dataset_id` indexes it)."""
        import torch

        from megatron_pn.data import resolve_blend

        return torch.tensor(resolve_blend(cfg.data).cluster_ids)

    def batch_routing(self, batch: dict, table) -> dict:
        """The cluster of each row, on the host (the model moves what it needs)."""
        from megatron_pn.data import cluster_ids_of

        return {"cluster_ids": cluster_ids_of(batch, table)}

    def route_held_out(self, cfg: Config, held, route: list, window_clusters) -> None:
        """Each window by its cluster (an assign dir of `pn-data assign`) or one expert."""
        import numpy as np

        if isinstance(route[0], str):
            held.cluster_ids = window_clusters(route[0], held)
        else:
            held.cluster_ids = np.full(len(held.windows), route[0], dtype=np.int64)
