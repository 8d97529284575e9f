import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py, tests/zoo.py, tests/steps.py

import zoo as _zoo  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def zoo():
    """zoo(name, **kwargs): a deepcopy of the torchvision model built once per session (seed 0,
    eval mode, random BatchNorm statistics); zoo.shared(name, **kwargs) the shared instance itself
    (read-only); zoo.converted(name, shape, **kwargs) a deepcopy of its conversion
    (normalize=False) for inputs of that shape, also done once."""
    return _zoo.zoo
