
import pytest
import torch

# Tests use tiny shapes: one intra-op thread is fastest (and steadier on a busy machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
