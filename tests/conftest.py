import pytest
import torch

# The longest test modules (seconds on a quiet 2-core machine, `--durations=0`), run first: the
# two workers of `make test` take whole modules in collection order, so the long ones must not
# come last and leave one worker running alone. The cluster module mostly waits on SLURM.
LONGEST_MODULES = ("test_slurm_cluster.py",  # 323 s
                   "test_deepspeed.py",      # 212 s
                   "test_lora.py",           # 133 s
                   "test_specialize.py",     # 129 s
                   "test_gpu_check.py",      # 123 s
                   "test_pn.py",             # 122 s
                   "test_experiment.py",     # 117 s
                   "test_parallel.py",       # 112 s
                   "test_startup.py",        # 112 s
                   "test_checkpoint.py")     # 104 s


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_MODULES.index(name) if name in LONGEST_MODULES else len(LONGEST_MODULES)
    items.sort(key=rank)  # stable: each module keeps its own order


@pytest.fixture(scope="module")
def world():
    """A megatron-core world of one process (gloo, CPU) for in-process model tests."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_pn import compat
    from megatron_pn.distributed import init_distributed, shutdown

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and robust to a busy machine
    compat.activate()
    init_distributed("cpu")
    ps.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    yield
    shutdown()
    torch.set_num_threads(threads)
