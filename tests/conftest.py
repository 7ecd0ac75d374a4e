import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks on a shared 2-core machine: intra-op threads only add synchronisation (and stalls
    when the machine is busy), so a module that asks for this runs single-threaded; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
