"""Train the flow-matching reference (FLUX architecture) on Fashion-MNIST: rectified flow, fixed seed, EMA, resumable.

Every random draw of step ``k`` comes from a generator seeded by ``(seed, k)``, so a run that is killed and resumed
from its last checkpoint continues exactly as an uninterrupted run would (a test checks this on a short run).

Example:
    >>> train_flux_reference(FluxTrainConfig(out_dir="runs/flux", steps=4000))   # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import load_fashion_mnist, resize_images
from .flux_reference import (
    FLUX_MODELS,
    IMAGE_SIZE,
    NULL_CLASS,
    ClassPrompts,
    build_flux_reference,
    image_ids,
    initialize_flux_weights,
    pack,
    shift_mu,
    shift_sigmas,
    text_ids,
)
from .train import learning_rate, load_train_state, save_train_state

STATE_FILE = "train_state.safetensors"


@dataclass(frozen=True)
class FluxTrainConfig:
    """Training hyper-parameters of the flow-matching reference; ``steps`` optimiser steps at peak rate ``lr``."""

    out_dir: str = "runs/flux"
    size: str = "Flux-FM-12-16"
    steps: int = 14000
    batch_size: int = 32
    lr: float = 1.5e-3
    warmup_steps: int = 300
    min_lr_ratio: float = 0.1
    ema_decay: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    null_prob: float = 0.1          # share of labels replaced by the null class (classifier-free guidance)
    logit_mean: float = 0.0         # timesteps: sigmoid(N(logit_mean, logit_std)), then FLUX's shift at 64 tokens
    logit_std: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    threads: int = 1

    def __post_init__(self) -> None:
        if self.size not in FLUX_MODELS:
            raise ValueError(f"size must be one of {sorted(FLUX_MODELS)}, got {self.size!r}")
        for name in ("steps", "batch_size", "checkpoint_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.null_prob < 1.0:
            raise ValueError(f"null_prob must be in [0, 1), got {self.null_prob}")


class FluxReferenceModule(torch.nn.Module):
    """The trained pair: ``transformer`` (diffusers' FluxTransformer2DModel) and ``prompts`` (the class table)."""

    def __init__(self, size: str) -> None:
        super().__init__()
        self.transformer = build_flux_reference(size)
        self.prompts = ClassPrompts(size)

    def forward(self, tokens: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Velocity ``[B, 64, 4]`` at packed tokens ``[B, 64, 4]``, sigmas ``[B]`` in (0, 1) and class ids ``[B]``."""
        seq, pooled = self.prompts(labels)
        return self.transformer(hidden_states=tokens, encoder_hidden_states=seq, pooled_projections=pooled,
                                timestep=sigma, img_ids=image_ids(IMAGE_SIZE), txt_ids=text_ids(),
                                return_dict=False)[0]


def train_flux_reference(cfg: FluxTrainConfig, stop_at: int | None = None) -> Path:
    """Train (or resume) and return the path of the training-state checkpoint; logs go to ``log.jsonl``.

    ``stop_at`` ends this call early at that step (as an interruption would); calling again resumes.
    """
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_fashion_mnist("train")
    images = resize_images(images, IMAGE_SIZE)
    torch.manual_seed(cfg.seed)
    model = FluxReferenceModule(cfg.size)
    initialize_flux_weights(model.transformer)
    ema = FluxReferenceModule(cfg.size)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    mu = shift_mu()

    state_path = out / STATE_FILE
    step, elapsed = (load_train_state(state_path, model, ema, opt) if state_path.exists() else (0, 0.0))
    model.train()
    log = open(out / "log.jsonl", "a")
    bar = tqdm(total=cfg.steps, initial=step, desc="train flux", unit="step", dynamic_ncols=True)
    start = time.time() - elapsed
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    while step < end:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=gen)
        x0, y = pack(images[idx]), labels[idx]
        u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(cfg.batch_size, generator=gen))
        sigma = shift_sigmas(u.clamp(1e-4, 1 - 1e-4), mu)
        noise = torch.randn(x0.shape, generator=gen)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.null_prob
        y = torch.where(drop, torch.full_like(y, NULL_CLASS), y)
        s = sigma.view(-1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        loss = F.mse_loss(model(xt, sigma, y), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.copy_(p_ema * decay + p * (1 - decay))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.checkpoint_every == 0 or step == end:
            elapsed = time.time() - start
            save_train_state(state_path, cfg, model, ema, opt, step, elapsed,
                             model_config=dict(model.transformer.config), extra={"kind": "flux"})
            log.write(json.dumps({"step": step, "loss": loss.item(), "elapsed_s": round(elapsed, 1)}) + "\n")
            log.flush()
    bar.close()
    log.close()
    return state_path
