"""Training data: weighted blends of indexed datasets, and a sample order that depends only on
the seed (not on the data-parallel size or micro-batching)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import real_text_documents, tiny_overrides, write_byte_dataset
from megatron_pn.config import load_config
from megatron_pn.data import DataError, StepSampler, build_datasets
from pn_base.errors import ConfigError

CONFIG = "configs/tiny/slm.yaml"


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    """megatron-core's BlendedDataset asks torch.distributed for the rank."""
    from megatron_pn.distributed import init_distributed, shutdown

    init_distributed("cpu")
    yield
    shutdown()


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    docs = real_text_documents()
    # Two corpora told apart by their bytes: one upper-cased, one lower-cased.
    upper = write_byte_dataset(root / "upper", [d.upper() for d in docs[: len(docs) // 2]])
    lower = write_byte_dataset(root / "lower", [d.lower() for d in docs[len(docs) // 2:]])
    return upper, lower


def config_for(blend: str, root, **extra):
    overrides = tiny_overrides("unused", root, **extra)
    overrides = [o for o in overrides if not o.startswith("data.blend=")] + [f"data.blend={blend}"]
    return load_config([CONFIG], overrides)


def test_weighted_blend_draws_in_proportion(two_datasets, tmp_path):
    upper, lower = two_datasets
    cfg = config_for(f"[[0.8, {upper}], [0.2, {lower}]]", tmp_path, **{"train.steps": 50})
    train = build_datasets(cfg, str(tmp_path / "cache"))
    ids = np.array([int(train[i]["dataset_id"]) for i in range(400)])
    assert abs((ids == 0).mean() - 0.8) < 0.05
    # And the samples really come from the named dataset.
    sample = train[int(np.flatnonzero(ids == 1)[0])]["tokens"].numpy()
    letters = sample[(sample >= 65) & (sample <= 122)]
    assert (letters >= 97).mean() > 0.95  # lower-case text


def test_sample_order_independent_of_data_parallel_size():
    global_batch, micro = 8, 2
    single = [i for mb in StepSampler(3, 6, global_batch, micro, 0, 1) for i in mb]
    for dp in (2, 4):
        per_rank = [[mb for mb in StepSampler(3, 6, global_batch, micro, r, dp)] for r in range(dp)]
        # Step by step, the ranks' micro-batches together are exactly the single run's batch.
        for step in range(3):
            chunk = global_batch // dp // micro
            together = [i for r in range(dp) for mb in per_rank[r][step * chunk:(step + 1) * chunk]
                        for i in mb]
            assert together == single[step * global_batch:(step + 1) * global_batch]


def test_split_leaving_no_validation_documents_is_an_error(tmp_path):
    prefix = write_byte_dataset(tmp_path / "few", ["one document", "two documents"])
    cfg = config_for(f"[{prefix}]", tmp_path / "run", **{"train.eval_interval": 5})
    with pytest.raises(DataError, match="leave none for the valid split"):
        build_datasets(cfg, str(tmp_path / "cache"))


def test_mixed_blend_entries_are_an_error(two_datasets, tmp_path):
    upper, lower = two_datasets
    with pytest.raises(ConfigError, match="either all prefixes or all"):
        build_datasets(config_for(f"[{upper}, [0.5, {lower}]]", tmp_path), str(tmp_path))
