"""SLM-cond's model: the dense GPT plus one learned input vector per cluster, added to every
token embedding of a sequence of that cluster,

    x[t] = E[token t] (+ P[t]) + c[cluster]

A control for projected networks: it gets the same information (each sequence's cluster, from
the same per-cluster datasets) through its input instead of through cluster-specific weights.
With c = 0 it is the SLM. For one cluster (or a mixture w of them, c = sum_i w[i] c[i]) it folds
into the dense SLM: every row of the embedding table plus c. With tied embeddings the output
layer then shifts every logit of a position by the same h . c, which no softmax sees: the
folded model predicts exactly the same distribution, at the SLM's size.

Under tensor parallelism the vectors are replicated (the embedding's output is); with pipeline
parallelism they live on the first stage, with the embedding.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

from megatron_pn import compat


class ClusterConditionedGPTModel(GPTModel):
    def __init__(self, *args, num_clusters: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.cluster_vectors = None
        if self.pre_process:
            config = self.config
            device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
            # zeros: the model starts as the SLM it is built like (and draws no random numbers)
            self.cluster_vectors = torch.nn.Parameter(torch.zeros(
                num_clusters, config.hidden_size, device=device, dtype=config.params_dtype))

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None,
                *args, cluster_ids, **kwargs):
        """As GPTModel.forward, plus `cluster_ids` [b] on the host: each sequence's cluster."""
        if self.pre_process and decoder_input is None:
            ids = torch.as_tensor(cluster_ids).view(-1).long()
            k = self.cluster_vectors.shape[0]
            bad = ids[(ids < 0) | (ids >= k)]
            if len(bad):
                raise ValueError(f"cluster id {int(bad[0])} is outside [0, {k}) "
                                 f"(model.num_experts = {k})")
            decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids)
            ids = compat.host_to_device(ids, decoder_input.device)
            decoder_input = decoder_input + self.cluster_vectors.index_select(0, ids)[None]
        return super().forward(input_ids, position_ids, attention_mask, decoder_input, labels,
                               *args, **kwargs)


@torch.no_grad()
def folded_state_dict(model: ClusterConditionedGPTModel, weights) -> dict[str, torch.Tensor]:
    """The state of the dense model that `model` is for the cluster mixture `weights` (one-hot:
    one cluster): its vector added to every row of the input embedding table."""
    vectors = model.cluster_vectors
    weights = torch.as_tensor(weights, dtype=vectors.dtype, device=vectors.device)
    if weights.shape != vectors.shape[:1]:
        raise ValueError(f"{weights.shape[0]} cluster weights for {vectors.shape[0]} clusters")
    state = {key: value for key, value in model.state_dict().items()
             if key != "cluster_vectors"}
    key = "embedding.word_embeddings.weight"
    state[key] = state[key] + weights @ vectors
    return state
