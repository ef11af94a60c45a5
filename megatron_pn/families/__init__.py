"""Model families: one object per `model.type`, the one place that says what a family means.

A family supplies everything the library asks of a model type (see `ModelFamily`): its layer
spec and model class, how a batch routes, the per-step scope and gradient finalization, its
parameter groups (both engines), its config and data checks, its projection and export hooks,
and what the experiment grid does with it. No other module compares `model.type`: they ask

    family_of(cfg).decoder_spec(cfg, tconfig, vp_stage)

Adding a family is one module in this package (a `ModelFamily` subclass, registered below) plus
its configs.
"""

from __future__ import annotations

from megatron_pn.families.base import ModelFamily, RoutedFamily, one_hot
from megatron_pn.families.cond import ConditionedFamily
from megatron_pn.families.dense import DenseFamily
from megatron_pn.families.mix import MixFamily
from megatron_pn.families.pn import PNFamily

FAMILIES: dict[str, ModelFamily] = {family.name: family
                                    for family in (DenseFamily(), PNFamily(), MixFamily(),
                                                   ConditionedFamily())}


def family_of(cfg_or_model) -> ModelFamily:
    """The family of a Config, or of its `model` section."""
    model = getattr(cfg_or_model, "model", cfg_or_model)
    family = FAMILIES.get(model.type)
    if family is None:  # config checks name the key first; this guards library callers
        from pn_base.errors import ConfigError

        raise ConfigError(f"model.type: '{model.type}' is not one of {', '.join(FAMILIES)}")
    return family


__all__ = ["FAMILIES", "ModelFamily", "RoutedFamily", "family_of", "one_hot"]
