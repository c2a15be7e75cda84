"""``python tests/distributed/launch.py COMMAND ...``: ``taylorseer COMMAND ...`` with the harness's patches
(harness.py), for ``torchrun`` in the command tests. ``TAYLORSEER_TEST_CP_FAIL=RANK:CALL`` (test-only) makes rank
RANK raise inside its CALL-th transformer call."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import patch_accelerator_count, patch_ring_lse  # noqa: E402


def _inject_fault() -> None:
    text = os.environ.get("TAYLORSEER_TEST_CP_FAIL")
    if not text or int(text.split(":")[0]) != int(os.environ.get("RANK", "0")):
        return
    from diffusers import FluxTransformer2DModel

    after = int(text.split(":")[1])
    original = FluxTransformer2DModel.forward
    calls = [0]

    def forward(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == after:
            raise RuntimeError(f"injected fault in rank {os.environ.get('RANK')} at transformer call {after}")
        return original(self, *args, **kwargs)

    FluxTransformer2DModel.forward = forward


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    patch_accelerator_count()
    patch_ring_lse()
    _inject_fault()
    from taylorseer.cli import main

    sys.exit(main(sys.argv[1:]))
