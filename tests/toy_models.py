"""The analytic toy models of the tests (random weights, no downloads), importable by name from any test as
``from toy_models import Toy`` (a module named ``conftest`` is ambiguous: tests/distributed has its own)."""

import torch
from torch import nn


class Poly(nn.Module):
    """Output is a known quadratic in t per feature; counts its executions."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.coef = nn.Parameter(torch.randn(3, width, dtype=torch.float64))
        self.calls = 0

    def forward(self, t):
        self.calls += 1
        return self.coef[0] + self.coef[1] * t + self.coef[2] * t * t


class PairOut(nn.Module):
    """Returns a tuple of two tensors (linear in t) to exercise structured outputs."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.coef = nn.Parameter(torch.randn(2, width, dtype=torch.float64))

    def forward(self, t):
        return self.coef[0] * t, (self.coef[1] * t, None)


class ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.poly = Poly()
        self.pair = PairOut()

    def forward(self, hidden_states, t):
        a, (b, _) = self.pair(t)
        return hidden_states + 0.5 * self.poly(t) + a - b


class Toy(nn.Module):
    """A two-block model ``h <- h + gate * poly(t)``; every quantity is analytic in t."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([ToyBlock(), ToyBlock()])
        self.out = nn.Linear(8, 8, dtype=torch.float64)

    def forward(self, h, t):
        for block in self.blocks:
            h = block(h, t)
        return self.out(h)


def tiny_flux_reference():
    """The FLUX-architecture reference at its tiny size ("Flux-FM-T-16"), random weights drawn N(0, 0.05) from seed
    0 (the trained ones are not what these tests check), frozen: a ``FluxReference`` (transformer + class prompts)."""
    from taylorseer.models.flux_pipeline import FluxReference
    from taylorseer.models.flux_reference import ClassPrompts, build_flux_reference

    torch.manual_seed(0)
    model = build_flux_reference("Flux-FM-T-16")
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return FluxReference(model.requires_grad_(False), ClassPrompts("Flux-FM-T-16").requires_grad_(False))
