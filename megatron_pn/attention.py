"""Core attention through `torch.nn.functional.scaled_dot_product_attention` (SDPA).

megatron-core's local `DotProductAttention` materializes the `[b, heads, s, s]` scores with
`baddbmm`, runs an unfused softmax and a second `bmm`. `SDPAttention` keeps its interface and
its tensor-parallel head split (it is a subclass: same constructor, same per-partition head
counts, same dropout probability) and hands the whole computation to SDPA, which picks a flash
or memory-efficient kernel on GPU and its fused flash kernel on CPU. Queries, keys and values
arrive as `[s, b, heads_per_partition, head_dim]`; keys and values carry
`num_query_groups_per_partition` heads (GQA: SDPA shares them across query heads itself).
"""

from __future__ import annotations

import contextlib

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if config.softmax_type != "vanilla" or config.window_size is not None:
            raise ValueError("SDPAttention supports the vanilla softmax over the full causal "
                             "window only; use model.attention_backend=local")
        # The local module divides the scale by the layer number and multiplies it back in its
        # softmax when apply_query_key_layer_scaling is set: SDPA takes the product at once.
        self.sdpa_scale = self.softmax_scale * (
            self.layer_number if config.apply_query_key_layer_scaling else 1)
        self.grouped = self.num_attention_heads_per_partition != self.num_query_groups_per_partition

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        assert packed_seq_params is None and attention_bias is None, (
            "SDPAttention takes neither packed sequences nor an attention bias")
        # [s, b, heads, dim] -> [b, heads, s, dim]
        query, key, value = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        seq_q, seq_k = query.size(2), key.size(2)
        # As the local module: a given mask (True = masked out) wins; otherwise causal.
        causal = (attention_mask is None and self.attn_mask_type == AttnMaskType.causal
                  and seq_q > 1)
        assert not causal or seq_q == seq_k, "causal attention needs as many queries as keys"
        mask = None if attention_mask is None else ~attention_mask
        dropout = self.attention_dropout.p if self.training else 0.0
        with self._dropout_rng():
            context = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                scale=self.sdpa_scale, enable_gqa=self.grouped)
        # [b, heads, s, dim] -> [s, b, heads * dim]
        batch = context.size(0)
        return context.permute(2, 0, 1, 3).reshape(seq_q, batch, self.hidden_size_per_partition)

    def _dropout_rng(self):
        """Dropout draws from the model-parallel RNG stream, as in the local module: different
        heads (TP shards) drop differently; with sequence parallelism the default stream."""
        if self.config.sequence_parallel or not self.training or not self.attention_dropout.p:
            return contextlib.nullcontext()
        return tensor_parallel.get_cuda_rng_tracker().fork()
