"""Data loader, checkpoints (corruption, truncation, checksum), resumable training, reference export/load."""

import gzip
import shutil

import pytest
import torch

from taylorseer.models.checkpoint import CheckpointError, file_sha256, load_tensors, save_tensors
from taylorseer.models.data import load_fashion_mnist
from taylorseer.models.pretrained import export_reference, load_reference
from taylorseer.models.train import TrainConfig, train_reference


def test_fashion_mnist_shapes_range_and_labels():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert x.min() == -1 and x.max() == 1 and sorted(y.unique().tolist()) == list(range(10))


def test_missing_dataset_names_the_apt_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("test", folder=tmp_path)


def test_truncated_idx_file_is_an_error(tmp_path):
    src = "/usr/share/datasets/fashion-mnist/"
    shutil.copy(src + "t10k-labels-idx1-ubyte.gz", tmp_path)
    with gzip.open(src + "t10k-images-idx3-ubyte.gz") as f:
        data = f.read()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(data[:5000])
    with pytest.raises(ValueError, match="truncated"):
        load_fashion_mnist("test", folder=tmp_path)


def test_bad_split():
    with pytest.raises(ValueError, match="split must be one of"):
        load_fashion_mnist("valid")


def test_checkpoint_round_trip_and_corruption(tmp_path):
    path = tmp_path / "w.safetensors"
    save_tensors(path, {"a": torch.arange(6.0)}, {"k": "v"})
    sha = file_sha256(path)
    tensors, meta = load_tensors(path, sha256=sha)
    assert torch.equal(tensors["a"], torch.arange(6.0)) and meta["k"] == "v"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_tensors(path, sha256=sha)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_tensors(path)  # no checksum given: still a clear error, never garbage
    with pytest.raises(CheckpointError, match="not found"):
        load_tensors(tmp_path / "missing.safetensors")


def _tiny(out, **kw):
    return TrainConfig(out_dir=str(out), size="DiT-FM-T/4", steps=6, batch_size=8, checkpoint_every=2,
                       warmup_steps=2, threads=1, **kw)


@pytest.mark.slow
def test_training_resumes_after_interruption(tmp_path):
    straight = train_reference(_tiny(tmp_path / "a"))
    train_reference(_tiny(tmp_path / "b"), stop_at=3)  # "killed" after step 3 (checkpointed at 2 and 3)
    _, meta = load_tensors(tmp_path / "b" / "train_state.safetensors")
    assert meta["step"] == "3"
    resumed = train_reference(_tiny(tmp_path / "b"))
    a, meta_a = load_tensors(straight)
    b, meta_b = load_tensors(resumed)
    assert meta_a["step"] == meta_b["step"] == "6"
    assert len(a) == len(b) > 100 and all(torch.equal(a[k], b[k]) for k in a)  # model, EMA and optimiser
    log = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert [int(line.split('"step": ')[1].split(",")[0]) for line in log] == [2, 3, 4, 6]


@pytest.mark.slow
def test_export_and_load_reference(tmp_path):
    state = train_reference(_tiny(tmp_path / "t"))
    out = export_reference(state, tmp_path / "ref.safetensors", update_manifest=False)
    model = load_reference(out, sha256=file_sha256(out))
    tensors, _ = load_tensors(state)
    for name, param in model.state_dict().items():
        assert torch.equal(param, tensors["ema." + name].half().float())
    assert not any(p.requires_grad for p in model.parameters())
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0x01
    out.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_reference(out, sha256=file_sha256(state))


def test_guidance_interval_limits_guidance_to_its_timesteps():
    from taylorseer.models.reference import build_reference
    from taylorseer.models.sampler import sample

    torch.manual_seed(0)
    model = build_reference("DiT-FM-T/4")
    labels = torch.tensor([0, 3])

    def run(**kw):
        return sample(model, labels, num_steps=4, guidance_scale=3.0, seed=0, **kw)  # timesteps 750, 500, 250, 0

    everywhere = run(guidance_interval=None)
    assert torch.equal(run(guidance_interval=(0, 1000)), everywhere)
    unguided = sample(model, labels, num_steps=4, guidance_scale=1.0, seed=0)
    assert torch.equal(run(guidance_interval=(1, 2), cfg_mode="split"), unguided)  # no timestep inside: cond only
    assert torch.allclose(run(guidance_interval=(1, 2)), unguided, atol=1e-5)  # same, from the doubled batch
    partial = run(guidance_interval=(0, 400))
    assert not torch.allclose(partial, everywhere, atol=1e-3) and not torch.allclose(partial, unguided, atol=1e-3)


def test_sampler_is_ddim_without_x0_clipping_as_in_dit():
    """An independent DDIM (eta 0, cosine alpha-bar from its formula, CFG on eps, x0 never clipped; DiT samples
    with clip_denoised=False) gives the sampler's images. Clipping x0 at high noise is what made guidance at every
    step look harmful on the embedded model (docs/model_card.md)."""
    import math

    from taylorseer.models.reference import build_reference
    from taylorseer.models.sampler import initial_noise, sample

    torch.manual_seed(0)
    model = build_reference("DiT-FM-T/4")
    labels, null, scale = torch.tensor([0, 3]), torch.tensor([10, 10]), 3.0

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / 1000) / alpha_bar(i / 1000), 0.999) for i in range(1000)]
    alphas = torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0)
    x = initial_noise(2, 0, model.config.sample_size).double()
    x0_range = 0.0
    with torch.no_grad():
        for t in (750, 500, 250, 0):  # "leading" spacing, 4 steps of 1000
            inp = torch.cat([x, x]).float()
            out = model(inp, timestep=torch.full((4,), t), class_labels=torch.cat([labels, null])).sample.double()
            cond, uncond = out.chunk(2)
            eps = uncond + scale * (cond - uncond)
            a, a_prev = alphas[t], alphas[t - 250] if t >= 250 else torch.tensor(1.0, dtype=torch.float64)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x0_range = max(x0_range, float(x0.abs().max()))
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    assert x0_range > 1.5  # clipping x0 to [-1, 1] would change this trajectory
    images = sample(model, labels, num_steps=4, guidance_scale=scale, guidance_interval=None, seed=0)
    torch.testing.assert_close(images.double(), x.clamp(-1, 1), atol=2e-4, rtol=0)


@pytest.mark.parametrize("bad", [(500, 0), (0,), (-1, 5), (0.0, 500), "0-500"])
def test_bad_guidance_interval_names_the_field(bad):
    from taylorseer.models.reference import build_reference
    from taylorseer.models.sampler import sample

    with pytest.raises(ValueError, match="guidance_interval"):
        sample(build_reference("DiT-FM-T/4"), torch.tensor([0]), num_steps=2, guidance_interval=bad)
