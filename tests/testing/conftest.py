import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    # The networks here are tiny: intra-op threads only add synchronisation (and stalls on a busy
    # machine), so run single-threaded and restore the setting afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
