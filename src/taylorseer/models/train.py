"""Train the reference DiT on Fashion-MNIST: fixed seed, EMA, progress bar, atomic resumable checkpoints.

Every random draw of step ``k`` comes from a generator seeded by ``(seed, k)``, so a run that is killed and
resumed from its last checkpoint continues exactly as an uninterrupted run would from that step.

Example:
    >>> train_reference(TrainConfig(out_dir="runs/reference", steps=4000))   # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm import tqdm

from .checkpoint import load_tensors, save_tensors
from .data import load_fashion_mnist, resize_images
from .reference import DIT_MODELS, SCHEDULE, build_reference, initialize_weights

STATE_FILE = "train_state.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters; ``steps`` is the total number of optimiser steps, ``lr`` the peak rate."""

    out_dir: str = "runs/reference"
    size: str = "DiT-FM-B/2-16"
    steps: int = 18000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    ema_decay: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    threads: int = 1
    beta_schedule: str = "squaredcos_cap_v2"
    model_label_dropout: bool = False  # True: diffusers' own 10% label dropout on top of ours (session-1 recipe)

    def __post_init__(self) -> None:
        if self.size not in DIT_MODELS:
            raise ValueError(f"size must be one of {sorted(DIT_MODELS)}, got {self.size!r}")
        if self.beta_schedule not in ("linear", "squaredcos_cap_v2"):
            raise ValueError(f"beta_schedule must be one of ['linear', 'squaredcos_cap_v2'], "
                             f"got {self.beta_schedule!r}")
        for name in ("steps", "batch_size", "checkpoint_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class LRSchedule(Protocol):
    """What ``learning_rate`` reads of a training config (``TrainConfig``, ``FluxTrainConfig``)."""

    @property
    def lr(self) -> float: ...
    @property
    def warmup_steps(self) -> int: ...
    @property
    def steps(self) -> int: ...
    @property
    def min_lr_ratio(self) -> float: ...


def learning_rate(cfg: LRSchedule, step: int) -> float:
    """Linear warm-up to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_train_state(path: Path, cfg, model, ema, opt, step: int, elapsed: float,
                     model_config: dict | None = None, extra: dict[str, str] | None = None) -> None:
    """Write a resumable training state (model, EMA and optimiser tensors; step, wall time and configs in the
    header). ``model_config``: the architecture's config (default: ``model.config``); ``extra``: more header keys."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for idx, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"opt.{idx}.{key}"] = torch.as_tensor(value)
    meta = {"step": str(step), "elapsed_s": f"{elapsed:.1f}", "train_config": json.dumps(asdict(cfg)),
            "model_config": json.dumps(dict(model.config) if model_config is None else model_config),
            **(extra or {})}
    save_tensors(path, tensors, meta)


def load_train_state(path: Path, model, ema, opt) -> tuple[int, float]:
    """Load a state written by ``save_train_state`` into ``model``, ``ema`` and ``opt``; returns (step, wall s)."""
    tensors, meta = load_tensors(path)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    return int(meta["step"]), float(meta.get("elapsed_s", 0.0))


def train_reference(cfg: TrainConfig, stop_at: int | None = None) -> Path:
    """Train (or resume) and return the path of the training-state checkpoint; logs go to ``log.jsonl``.

    ``stop_at`` ends this call early at that step (as an interruption would); calling again resumes.
    """
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_fashion_mnist("train")
    torch.manual_seed(cfg.seed)
    model = build_reference(cfg.size)
    if not cfg.model_label_dropout:
        for block in model.transformer_blocks:
            block.norm1.emb.class_embedder.dropout_prob = 0.0  # only the trainer's 10% null labels remain
    images = resize_images(images, model.config.sample_size)
    initialize_weights(model)
    ema = build_reference(cfg.size)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    alphas_cumprod = DDPMScheduler(**{**SCHEDULE, "beta_schedule": cfg.beta_schedule}).alphas_cumprod.float()

    state_path = out / STATE_FILE
    step, elapsed = (load_train_state(state_path, model, ema, opt) if state_path.exists() else (0, 0.0))
    model.train()
    log = open(out / "log.jsonl", "a")
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    start = time.time() - elapsed
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    while step < end:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # the global RNG too: diffusers' label dropout draws from it
        idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=gen)
        x0, y = images[idx], labels[idx]
        t = torch.randint(0, len(alphas_cumprod), (cfg.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        # Classifier-free guidance: 10% null labels here; with model_label_dropout, diffusers' LabelEmbedding drops
        # another 10% in train mode (about 19% null in all; the session-1 recipe, measured no better or worse).
        drop = torch.rand(cfg.batch_size, generator=gen) < 0.1
        y = torch.where(drop, torch.full_like(y, model.config.num_embeds_ada_norm), y)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        loss = F.mse_loss(model(xt, timestep=t, class_labels=y).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # EMA warm-up: early weights fade out fast
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.copy_(p_ema * decay + p * (1 - decay))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.checkpoint_every == 0 or step == end:
            elapsed = time.time() - start
            save_train_state(state_path, cfg, model, ema, opt, step, elapsed)
            log.write(json.dumps({"step": step, "loss": loss.item(), "elapsed_s": round(elapsed, 1)}) + "\n")
            log.flush()
    bar.close()
    log.close()
    return state_path
