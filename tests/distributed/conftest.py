"""The session's one distributed run (world.py) and the one-process references it is compared with.

``cp_run`` starts the 4-process world once (forked from a fork server), then computes in this process, while the
world runs: every method of cases.py alone, a few of them with the sharded kernels emulated
(harness.emulate_ulysses), ``taylorseer generate`` and ``taylorseer sample`` alone (the sample also emulating
K = 2), and the DiT vote cases alone.
"""

from __future__ import annotations

import time

import cases
import pytest
import torch
import world
from harness import emulate_ulysses, fork_world, free_port, join_world, stop_fork_server, stop_world

WORLD_SECONDS = 600  # the world is killed (and the tests fail) if it has not finished by then


@pytest.fixture(scope="session")
def cp_run(tmp_path_factory):
    """(folder with the world's records, the one-process references)."""
    from taylorseer.cli import main
    from taylorseer.distributed.flux import build_model
    from taylorseer.models.flux_reference import IMAGE_SIZE, PROMPT_TOKENS

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("cp")
    calibration = cases.calibrate(str(folder / "cal.safetensors"))
    (folder / "gate.json").write_text(world.GATE)
    start = time.monotonic()
    context = fork_world(world.run, world.WORLD, str(folder), (free_port(), free_port()))
    try:
        configs = cases.methods(calibration)
        pipe = build_model(cases.MODEL)
        alone = {"full": cases.generate(pipe, None)}
        alone.update({name: cases.generate(pipe, config) for name, config in configs.items()})
        image_tokens = (IMAGE_SIZE // 2) ** 2  # FLUX packs 2x2 latent pixels per token
        for name, k in world.EMULATED:
            with emulate_ulysses(k, PROMPT_TOKENS, image_tokens):
                alone[f"{name}/emulated/{k}"] = cases.generate(pipe, None if name == "full" else configs[name])
        assert main([*world.GENERATE, "--out", str(folder / "one-generate")]) == 0
        sample = world.sample_args(str(folder / "one-sample"), str(folder / "gate.json"))
        assert main(sample) == 0
        with emulate_ulysses(2, PROMPT_TOKENS, image_tokens):
            assert main([*sample[:-1], str(folder / "one-sample-emulated")]) == 0
        alone["dit"] = [cases.dit_decisions(seed) for seed in cases.DIT_SEEDS]
    except BaseException:
        stop_world(context)
        stop_fork_server()
        raise
    try:
        join_world(context, WORLD_SECONDS)
    finally:
        stop_fork_server()
    alone["world_seconds"] = time.monotonic() - start
    torch.save(alone, folder / "alone.pt")  # kept with the world's records (pytest --basetemp) for reading them
    return folder, alone
