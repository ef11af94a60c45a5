"""Closed-form projection of one expert: a PN model's state -> the state of the dense SLM that
expert i is (W[l,i] = sum_r (E[i] @ M[l])[r] T[l][:,:,r] for every projected linear).

Works on any TP rank: a rank's bank slice projects to the dense weight's slice of that rank.
"""

from __future__ import annotations

import torch

from megatron_pn.pn.layers import ProjectedLinear


@torch.no_grad()
def dense_state_dict(pn_model: torch.nn.Module, expert: int | None = None,
                     code: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """State dict for a dense GPTModel of the same shape, holding expert `expert` (or the
    network a given `code` of length m projects to, e.g. a mixture of expert codes)."""
    codes = pn_model.expert_codes
    if code is None:
        if not 0 <= expert < codes.shape[0]:
            raise ValueError(f"expert {expert} is outside [0, {codes.shape[0]})")
        code = pn_model.codes((expert,))[0]
    projected = {name: module for name, module in pn_model.named_modules()
                 if isinstance(module, ProjectedLinear)}
    codes_only = {name for name, _ in pn_model.code_parameters()}  # E, a learned code map
    state = {}
    for key, value in pn_model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if key in codes_only or (owner in projected and leaf in ("bank", "code_projection")):
            continue
        state[key] = value
    for name, module in projected.items():
        state[f"{name}.weight"] = module.project(code.view(1, -1).to(codes))[0].clone()
    return state
