import pytest
import torch


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
