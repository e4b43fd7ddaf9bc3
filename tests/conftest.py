import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # scenarios.py


@pytest.fixture(autouse=True)
def _small_cpu() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
