"""Shared fixtures: tiny models built from configs (random weights, no downloads)."""

import pytest
import torch

from taylorseer.models.reference import build_reference
from toy_models import Toy

torch.set_num_threads(1)


@pytest.fixture
def toy():
    return Toy()


@pytest.fixture
def tiny_dit():
    torch.manual_seed(0)
    model = build_reference("DiT-FM-T/4")
    # Random non-zero adaLN weights so every block contributes (a fresh DiT init would zero them).
    for p in model.parameters():
        p.requires_grad_(False)
    return model
