"""SLM-cond (`model.type: cond`), a control for SLM-pn: the dense SLM with a learned vector per
cluster added to its token embeddings (megatron_pn/conditioned.py). It is trained on the same
per-cluster datasets with the same cluster ids as a projected network and evaluated with them, so
the two differ only in how the cluster enters: an input vector here, the weights in a PN.

Specialization (pn-project) conditions on the spec set's cluster and folds its vector into the
embedding table: the dense SLM, the same next-token distributions (conditioned.py), fine-tuned
like the SLM.
"""

from __future__ import annotations

from megatron_pn.config import Config
from megatron_pn.families.base import RoutedFamily
from megatron_pn.families.dense import layer_spec


class ConditionedFamily(RoutedFamily):
    name = "cond"
    shape_keys = ("num_experts",)

    def decoder_spec(self, cfg: Config, tconfig, vp_stage: int | None):
        return layer_spec(cfg)

    def model_class(self, cfg: Config) -> tuple[type, dict]:
        from megatron_pn.conditioned import ClusterConditionedGPTModel

        return ClusterConditionedGPTModel, {"num_clusters": cfg.model.num_experts}

    def lr_overrides(self, train) -> dict[str, dict]:
        """train.cond_vector_lr_mult x the run's LR schedule for the cluster vectors."""
        if train.cond_vector_lr_mult == 1.0:
            return {}
        return {"*cluster_vectors": {"max_lr": train.lr * train.cond_vector_lr_mult,
                                     "min_lr": train.min_lr * train.cond_vector_lr_mult}}

    def expert_parameters(self, chunks: list, total: int) -> int:
        """The folded dense model: the SLM's shape, without the vectors."""
        return total - chunks[0].cluster_vectors.numel()

    def dense_state(self, model, weights=None) -> dict:
        from megatron_pn.conditioned import folded_state_dict

        return folded_state_dict(model, weights)
