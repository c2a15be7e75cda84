"""``taylorseer sample``: data-parallel under torchrun (gloo, CPU), resumable, the same samples for any process count.

The runs are small (8 samples of the embedded model, 12 DDIM steps, batches of 2) and use the confidence gate
``gate-t0.08``: at 12 steps its decisions differ between batches (7 or 8 full steps), so a rank whose batch steered
another rank's decisions (agreement across data-parallel ranks) would change that rank's images and fail the
bitwise comparisons below.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from taylorseer.eval import sample as S
from taylorseer.runtime import step

N, STEPS, BATCH, METHOD = 8, 12, 2, "gate-t0.08"
FLAGS = ["--num-samples", str(N), "--method", METHOD, "--steps", str(STEPS), "--batch-size", str(BATCH),
         "--image-dtype", "float32", "--threads", "1"]


def _spec(**overrides) -> S.SampleSpec:
    fields = dict(method=S.resolve_method(METHOD, STEPS), num_samples=N, batch_size=BATCH, image_dtype="float32")
    return S.SampleSpec(**{**fields, **overrides})


def _torchrun(out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m taylorseer sample ...`` (gloo on CPU)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT")}
    clean.update(OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "taylorseer",
           "sample", *FLAGS, "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=clean, timeout=600)


def _samples(out: Path) -> dict[str, np.ndarray]:
    return S.read_npz(out / "samples.npz")


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: the same job in this process (no process group)."""
    out = tmp_path_factory.mktemp("one") / "run"
    result = S.run_sample(_spec(), out, threads=1)
    assert result["complete"] and result["generated"] == N // BATCH
    return out


#################################################################################
#                  Which sample is which (pure functions)                       #
#################################################################################

def test_noise_and_label_of_a_sample_depend_on_seed_and_index_only():
    block = S.sample_noise(3, range(8), (1, 4, 4))
    for i in (0, 5, 7):
        assert torch.equal(S.sample_noise(3, [i], (1, 4, 4))[0], block[i])
    assert not torch.equal(S.sample_noise(4, [5], (1, 4, 4))[0], block[5])
    assert not torch.equal(block[0], block[1])
    assert S.sample_labels([3, 13, 23]).tolist() == [3, 3, 3]
    assert S.sample_labels([0, 1, 2, 3], classes=[7, 9]).tolist() == [7, 9, 7, 9]
    seeds = {S.sample_seed(s, i) for s in range(20) for i in range(200)}
    assert len(seeds) == 20 * 200  # no collisions between (seed, index) pairs


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_ranks_share_the_fixed_batches_disjointly_and_completely(world):
    blocks = S.batch_ranges(11, 3)
    assert [list(b) for b in blocks] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]
    shares = [S.rank_batches(len(blocks), r, world) for r in range(world)]
    assert sorted(k for share in shares for k in share) == list(range(len(blocks)))


def test_the_sampler_from_a_seeds_noise_equals_the_sampler_from_that_seed(tiny_dit):
    from taylorseer.models.sampler import initial_noise, sample

    labels = torch.tensor([0, 3, 7])
    for mode in ("batch", "split"):
        expected = sample(tiny_dit, labels, num_steps=4, seed=3, cfg_mode=mode)
        noise = initial_noise(3, 3, tiny_dit.config.sample_size)
        assert torch.equal(sample(tiny_dit, labels, num_steps=4, cfg_mode=mode, noise=noise), expected)


def test_agreement_group_none_keeps_each_ranks_observation(monkeypatch):
    """``agree`` all-reduces over the default group, over a given group, or (``agreement_group(None)``) not at all."""
    dist = torch.distributed
    calls = []

    def fake_all_reduce(tensor, op=None, group=None):
        calls.append(group)
        tensor.fill_(9.0)  # another rank's larger observation

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    assert step.agree([0.5, 0.1]) == [9.0, 9.0] and calls == [None]
    with step.agreement_group(None):
        assert step.agree([0.5, 0.1]) == [0.5, 0.1]
    sentinel = object()
    with step.agreement_group(sentinel):
        assert step.agree([0.5]) == [9.0]
    assert calls == [None, sentinel]
    assert step.agree([0.5]) == [9.0]  # restored on exit


#################################################################################
#                 Acceptance: 2 processes (gloo) = 1 process                    #
#################################################################################

@pytest.mark.slow
def test_two_processes_give_bitwise_the_samples_of_one(one_process, tmp_path):
    out = tmp_path / "two"
    run = _torchrun(out)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = _samples(one_process), _samples(out)
    assert np.array_equal(two["indices"], np.arange(N)) and np.array_equal(one["indices"], two["indices"])
    assert two["images"].dtype == np.float32 and two["images"].shape == (N, 1, 16, 16)
    assert np.array_equal(one["images"], two["images"])  # bitwise: same batches, decisions per batch
    shards = _manifest(out)["shards"]
    assert {s["rank"] for s in shards} == {0, 1}
    steps = [s["steps_full"] for s in shards]
    assert steps == [s["steps_full"] for s in _manifest(one_process)["shards"]]
    assert len(set(steps)) > 1  # the gate decided differently per batch: agreement across ranks would show
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == N and 0 <= metrics["class_accuracy"] <= 1 and metrics["fid_fmnist"] > 0


#################################################################################
#             Acceptance: a rank killed part way, then restarted                #
#################################################################################

@pytest.mark.slow
def test_a_killed_run_restarted_completes_the_set_without_duplicates(one_process, tmp_path):
    out = tmp_path / "killed"
    killed = _torchrun(out, env={S.FAULT_ENV: "1:1"})  # rank 1 SIGKILLs itself after its first shard
    assert killed.returncode != 0
    assert not (out / "samples.npz").exists()
    assert _manifest(out)["status"]["complete"] is False
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "shards").glob("shard-*.npz")}
    done = {int(S.SHARD_NAME.fullmatch(name).group(2)) for name in before}
    assert 1 in done and 3 not in done  # rank 1 wrote batch 1, then died before batch 3

    restarted = _torchrun(out)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    after = {p.name: p for p in (out / "shards").glob("shard-*.npz")}
    for name, (mtime, data) in before.items():  # kept, not regenerated
        assert after[name].stat().st_mtime_ns == mtime and after[name].read_bytes() == data
    new = {int(S.SHARD_NAME.fullmatch(name).group(2)) for name in set(after) - set(before)}
    assert new == set(range(N // BATCH)) - done  # only the missing batches were generated
    status = _manifest(out)["status"]
    assert status["complete"] is True and status["samples_present"] == N
    assert status["missing_indices"] == [] and status["duplicate_indices"] == [] and status["duplicate_shards"] == []
    merged = _samples(out)
    assert np.array_equal(merged["indices"], np.arange(N))
    assert np.array_equal(merged["images"], _samples(one_process)["images"])
    assert not list((out / "shards").glob(".*.tmp"))
    assert len(_manifest(out)["runs"]) == 2


#################################################################################
#                   Resume, refusal, merge (one process)                        #
#################################################################################

def test_a_corrupt_or_truncated_shard_is_ignored_and_regenerated(one_process, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(one_process, out)
    (out / "samples.npz").unlink()
    first, second = sorted((out / "shards").glob("shard-*.npz"))[1:3]
    first.write_bytes(first.read_bytes()[:-100])  # truncated
    data = bytearray(second.read_bytes())
    data[1000] ^= 0xFF  # one flipped byte inside the images' data: the zip CRC catches it
    second.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="is ignored") as caught:
        result = S.run_sample(_spec(), out, threads=1)
    assert {first.name, second.name} <= {Path(str(w.message).split()[1]).name for w in caught}
    assert result["generated"] == 2 and result["kept"] == 2 and result["complete"]
    assert np.array_equal(_samples(out)["images"], _samples(one_process)["images"])


@pytest.mark.parametrize("change, field", [
    (dict(seed=1), "seed is 0 there but 1 here"),
    (dict(num_samples=10), "num_samples is 8 there but 10 here"),
    (dict(batch_size=4), "batch_size is 2 there but 4 here"),
    (dict(method=S.resolve_method("fora-N5", STEPS)), "method.config"),
    (dict(guidance_scale=2.0), "guidance_scale is 1.5 there but 2.0 here"),
])
def test_another_run_in_the_same_folder_is_refused_naming_the_field(one_process, tmp_path, change, field):
    out = tmp_path / "copy"
    shutil.copytree(one_process, out)
    manifest = (out / "manifest.json").read_bytes()
    with pytest.raises(S.SampleDirError, match=field.replace(".", r"\.")):
        S.run_sample(_spec(**change), out, threads=1)
    assert (out / "manifest.json").read_bytes() == manifest  # untouched


def test_cli_refuses_in_one_line_and_merges_with_a_reference(one_process, tmp_path, capsys):
    from taylorseer.cli import main

    out = tmp_path / "copy"
    shutil.copytree(one_process, out)
    assert main(["sample", "--default-malloc", *FLAGS, "--seed", "5", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "seed is 0 there but 5 here" in err
    assert main(["sample", "--default-malloc", "--merge", "--num-samples", "8", "--out", str(out)]) == 2
    assert "--merge" in capsys.readouterr().err
    assert main(["sample", "--default-malloc", "--num-samples", "8", "--out", str(tmp_path / "x")]) == 2
    assert "exactly one of --method" in capsys.readouterr().err
    assert main(["sample", "--default-malloc", "--merge", "--out", str(out), "--reference",
                 str(one_process)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # identical images: PSNR is infinite (the bench's _quality may record that as null with the reason)
    assert metrics["psnr"] == float("inf") or "inf" in metrics["reasons"]["psnr"]
    assert metrics["ssim"] == pytest.approx(1.0)
    assert metrics["fid_to_reference"] == pytest.approx(0.0, abs=1e-6)

    fewer = tmp_path / "ddim"
    result = S.run_sample(_spec(method=S.resolve_method("ddim-4")), fewer, threads=1, reference=one_process)
    assert 10 < result["psnr"] < 60 and result["fid_to_reference"] > 0 and result["steps_full_mean"] == 4
    other_seed = tmp_path / "seed1"
    S.run_sample(_spec(method=S.resolve_method("ddim-2"), seed=1), other_seed, threads=1)
    with pytest.raises(S.SampleDirError, match="not of the same samples: seed"):
        S.evaluate(other_seed, reference=one_process)


def test_merge_of_an_incomplete_folder_says_what_is_missing(one_process, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(one_process, out)
    next((out / "shards").glob("shard-*-000002.npz")).unlink()
    with pytest.raises(S.SampleDirError, match="2 of 8 samples missing"):
        S.merge_samples(out)
    status = _manifest(out)["status"]
    assert status["complete"] is False and status["missing_indices"] == [[4, 5]]


#################################################################################
#                         A diffusers pipeline folder                           #
#################################################################################

@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    import diffusers

    torch.manual_seed(0)
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=1).eval()
    for p in transformer.parameters():  # zero-initialised gates would hide whole modules
        if p.abs().max() == 0:
            p.data.normal_(0, 0.05)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), latent_channels=4, norm_num_groups=2, layers_per_block=1).eval()
    folder = tmp_path_factory.mktemp("tiny-dit")
    diffusers.DiTPipeline(transformer, vae, diffusers.DDIMScheduler()).save_pretrained(folder)
    return folder


def test_a_pipeline_samples_with_one_generator_per_sample(tiny_pipeline, tmp_path):
    import taylorseer
    from taylorseer.generate import load_pipeline

    config = taylorseer.preset("paper_dit")
    spec = S.SampleSpec(S.method_from_config(config, 8), num_samples=3, seed=4, batch_size=2, model=str(tiny_pipeline),
                        prompt="0, 1")
    result = S.run_sample(spec, tmp_path / "pipe", threads=1)
    assert result["complete"] and result["steps_full_mean"] == 3
    merged = _samples(tmp_path / "pipe")
    assert merged["images"].shape == (3, 8, 8, 3) and merged["images"].dtype == np.uint8
    model = _manifest(tmp_path / "pipe")["identity"]["model"]
    assert model["pipeline"] == "DiTPipeline" and len(model["weights_sha256"]) == 64

    pipe = load_pipeline(str(tiny_pipeline))  # sample 2 (label 0, alone in the last batch), by hand
    pipe.set_progress_bar_config(disable=True)
    with taylorseer.apply(pipe, config):
        alone = pipe(class_labels=[0], num_inference_steps=8, output_type="np",
                     generator=[torch.Generator().manual_seed(S.sample_seed(4, 2))]).images
    assert np.array_equal(merged["images"][2], (alone[0] * 255).round().astype(np.uint8))
