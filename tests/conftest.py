import os

import pytest
import torch

# Two threads everywhere, as on the development machine and CI; deterministic seeds per test.
torch.set_num_threads(int(os.environ.get("VIMERGE_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
