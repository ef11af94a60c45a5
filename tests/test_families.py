"""The model-family seam (megatron_pn/families): the one place that knows what a model.type
means. Cheap: no training."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import REPO

LIBRARY = [REPO / "megatron_pn", REPO / "data_tools", REPO / "benchmarks"]


def type_comparisons(path: Path) -> list[str]:
    """`X.type == "..."`, `X.type in (...)`, `X.type != "..."` on a model section: where a module
    decides by itself what a family means."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        on_model = any(isinstance(side, ast.Attribute) and side.attr == "type"
                       and "model" in ast.unparse(side.value) or ast.unparse(side) == "m.type"
                       for side in sides)
        literal = any(isinstance(side, ast.Constant) and isinstance(side.value, str)
                      or isinstance(side, (ast.Tuple, ast.List, ast.Set)) for side in sides)
        if on_model and literal:
            found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_outside_the_registry_compares_model_type():
    files = [p for root in LIBRARY for p in root.rglob("*.py")
             if "families" not in p.relative_to(REPO).parts]
    found = [hit for path in files for hit in type_comparisons(path)]
    assert not found, "compare through megatron_pn.families instead:\n" + "\n".join(found)


def test_the_scan_finds_a_comparison(tmp_path):
    """The scan above can fail: it sees the forms the tree used before the registry."""
    sample = tmp_path / "sample.py"
    sample.write_text('if cfg.model.type == "pn": pass\nif m.type in ("pn", "mix"): pass\n'
                      'is_pn = saved.model.type != "dense"\nok = device.type == "cuda"\n')
    assert len(type_comparisons(sample)) == 3


def test_registry_answers_for_every_model_type():
    from megatron_pn.config import ModelConfig
    from pn_base.errors import ConfigError
    from megatron_pn.families import FAMILIES, family_of

    assert set(FAMILIES) == {"dense", "pn", "mix", "cond"}
    for name, family in FAMILIES.items():
        assert family_of(ModelConfig(type=name)) is family and family.name == name
    assert family_of(ModelConfig(type="pn")).routed
    assert not family_of(ModelConfig(type="mix")).routed
    assert family_of(ModelConfig(type="mix")).per_cluster_jobs
    with pytest.raises(ConfigError, match="model.type: .moe. is not one of dense, pn, mix, cond"):
        family_of(ModelConfig(type="moe"))


def test_lr_overrides_give_both_engines_the_same_groups():
    """One declaration (a name glob -> its LR schedule) builds megatron-core's override and
    DeepSpeed's parameter group."""
    from megatron_pn.config import load_config
    from megatron_pn.families import family_of

    cfg = load_config([str(REPO / "configs/tiny/pn.yaml")],
                      ["train.pn_bank_lr_mult=0.5", "train.lr=1e-3", "train.min_lr=1e-4"])
    family = family_of(cfg)
    schedule = family.lr_override("module.decoder.layers.0.mlp.linear_fc1.bank", cfg.train)
    assert schedule == pytest.approx({"max_lr": 5e-4, "min_lr": 5e-5})
    assert family.lr_override("decoder.layers.0.mlp.linear_fc1.code_projection", cfg.train) is None
    cond = load_config([str(REPO / "configs/tiny/cond.yaml")],
                       ["train.cond_vector_lr_mult=0.1", "train.lr=1e-3", "train.min_lr=1e-4"])
    assert family_of(cond).lr_override("module.cluster_vectors", cond.train) == pytest.approx(
        {"max_lr": 1e-4, "min_lr": 1e-5})
    assert family_of(cond).lr_override("module.embedding.word_embeddings.weight",
                                       cond.train) is None
    dense = load_config([str(REPO / "configs/tiny/slm.yaml")], ["train.pn_bank_lr_mult=0.5"])
    assert family_of(dense).lr_override("decoder.layers.0.mlp.linear_fc1.weight",
                                        dense.train) is None


def test_families_import_no_megatron_core():
    """Commands' --help ask the registry: importing it must not pull megatron-core in."""
    import subprocess
    import sys

    code = ("import sys, megatron_pn.families; "
            "print([m for m in ('megatron.core', 'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    assert out.strip() == "[]"
