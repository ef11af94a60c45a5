"""SLM-d: a student fine-tuned on the specialization data and a teacher's next-token
distributions (paper: a fine-tuned LLM teaches a pretrained SLM).

Per token:  (1 - w) * CE(student, label) + w * T^2 * KL(teacher_T || student_T)
with w = distill.weight and T = distill.temperature (the T^2 keeps gradient scales comparable
across temperatures, as in Hinton et al.).

Logits are vocabulary-parallel over TP: each rank holds the same vocabulary slice of teacher and
student, so the softmax normalizers and the KL sum are all-reduced over the TP group. The teacher
checkpoint (written at any TP/PP) is loaded at this run's layout; it runs without gradients,
outside DDP and the optimizer. Pipeline parallelism is not supported here (the teacher would
need a schedule of its own).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                   reduce_from_tensor_model_parallel_region)

from megatron_pn import checkpoint
from megatron_pn.config import Config
from pn_base.errors import ConfigError


def _sum_over_tensor_parallel(x: torch.Tensor) -> torch.Tensor:
    """Sum over TP ranks whose gradient is summed too: every rank's part of the loss depends
    on the sum (the softmax normalizer), so each slice's gradient gathers all ranks' parts.
    (reduce_from: all-reduce forward; copy_to: all-reduce backward.)"""
    return copy_to_tensor_model_parallel_region(reduce_from_tensor_model_parallel_region(x))


def vocab_parallel_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over a vocabulary split across TP ranks (this rank's slice returned)."""
    shift = logits.detach().max(dim=-1, keepdim=True).values
    dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=ps.get_tensor_model_parallel_group())
    shifted = logits - shift
    normalizer = _sum_over_tensor_parallel(shifted.exp().sum(-1, keepdim=True))
    return shifted - normalizer.log()


def distillation_loss(student_logits, teacher_logits, labels, weight: float,
                      temperature: float) -> torch.Tensor:
    """Per-token loss [b, s] from vocabulary-parallel logits [b, s, V/tp]."""
    student_logits = student_logits.float()
    # (megatron-core's cross entropy works in place on the logits it is given)
    cross_entropy = vocab_parallel_cross_entropy(student_logits.clone(), labels)
    log_q = vocab_parallel_log_softmax(student_logits / temperature)
    log_p = vocab_parallel_log_softmax(teacher_logits.float() / temperature)
    # The loss is replicated on TP ranks: each rank's slice of the KL sum gets gradient once.
    kl = reduce_from_tensor_model_parallel_region((log_p.exp() * (log_p - log_q)).sum(-1))
    return (1.0 - weight) * cross_entropy + weight * temperature**2 * kl


def build_teacher(cfg: Config, device_type: str):
    """The teacher model at this run's parallel layout, weights from distill.teacher."""
    from megatron_pn.families import family_of
    from megatron_pn.model import build_model, padded_vocab_size

    if cfg.parallel.pipeline > 1:
        raise ConfigError("distill.teacher: distillation needs parallel.pipeline=1")
    teacher_cfg = checkpoint.saved_config(cfg.distill.teacher)
    if family_of(teacher_cfg).routed:  # its forward needs each row's cluster
        raise ConfigError("distill.teacher: a projected network cannot teach; project an expert "
                          "(pn-project) or use a dense checkpoint")
    if padded_vocab_size(teacher_cfg.model) != padded_vocab_size(cfg.model):
        raise ConfigError(f"distill.teacher: vocabulary {teacher_cfg.model.vocab_size} differs "
                          f"from the student's {cfg.model.vocab_size}; use the same tokenizer")
    teacher_cfg = dataclasses.replace(teacher_cfg, parallel=cfg.parallel, train=cfg.train)
    [teacher] = build_model(teacher_cfg, device_type, initialize=False)
    checkpoint.load(checkpoint.resolve(cfg.distill.teacher), [teacher])
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher
