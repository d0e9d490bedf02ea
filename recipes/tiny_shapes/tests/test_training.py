"""The build's training parts: latent noise, the resumable loop and its schedule, batches, Min-SNR."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from recipes.tiny_shapes.architectures import BETAS
from recipes.tiny_shapes.autoencoder import _add_latent_noise
from recipes.tiny_shapes.denoiser import _Batches, min_snr_weights
from recipes.tiny_shapes.loop import train


def test_latent_noise_is_relative_to_the_latents_scale() -> None:
    """Scaling the latents scales the noise with them: the encoder cannot outgrow it."""
    latents = torch.randn(64, 4, 8, 8)
    torch.manual_seed(0)
    small = _add_latent_noise(latents, 0.5) - latents
    torch.manual_seed(0)
    large = _add_latent_noise(100 * latents, 0.5) - 100 * latents
    torch.testing.assert_close(large, 100 * small, rtol=1e-4, atol=1e-4)
    assert 0.1 < small.std() < 0.5
    assert torch.equal(_add_latent_noise(latents, 0.0), latents)


def _learning_rates(work_dir: Path, steps: int, interrupt_at: int | None = None) -> dict[int, float]:
    """The learning rate each step of a ``train`` run sees, and its checkpoint; SIGINT at step ``interrupt_at``."""
    module = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    seen = {}

    def step(i: int) -> torch.Tensor:
        seen[i] = optimizer.param_groups[0]["lr"]
        if i == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        return module(torch.ones(1, 2)).square().sum()

    with contextlib.suppress(KeyboardInterrupt):
        train("test", work_dir, module, optimizer, step, steps, warmup=8, cooldown=5, checkpoint_every=100)
    return seen


def test_training_schedule_survives_resume_and_the_last_step_is_saved(tmp_path: Path) -> None:
    whole = _learning_rates(tmp_path / "whole", 20)
    warm_up = [0.0125 * (i + 1) for i in range(8)]
    cool_down = [0.1 * k / 6 for k in range(5, 0, -1)]
    assert [whole[i] for i in range(20)] == pytest.approx(warm_up + [0.1] * 7 + cool_down)
    assert torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["step"] == 20
    first = _learning_rates(tmp_path / "resumed", 20, interrupt_at=4)  # during the warm-up
    assert sorted(first) == list(range(5))
    second = _learning_rates(tmp_path / "resumed", 20)
    assert sorted(second) == list(range(5, 20))
    assert {**first, **second} == pytest.approx(whole)
    with pytest.raises(ValueError, match="cooldown <= steps"):
        _learning_rates(tmp_path / "short", 4)


def test_training_batches_depend_only_on_the_step() -> None:
    """A resumed stage draws the batches an uninterrupted one would have: no replay from step 0."""
    latents, ids = torch.randn(50, 4, 2, 2), torch.arange(1, 51).unsqueeze(1).repeat(1, 3)
    empty = torch.zeros(3, dtype=torch.long)
    first = _Batches(latents, ids, empty, seed=3, drop=0.5)
    again = _Batches(latents, ids, empty, seed=3, drop=0.5)
    for step in (0, 7):
        for a, b in zip(first(step, 6), again(step, 6), strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not torch.equal(first(7, 6)[4], first(8, 6)[4])
    dropped = []
    for step in range(40):
        index, batch_ids, *_ = first(step, 6)
        kept = batch_ids[:, 0] != 0
        assert torch.equal(batch_ids[kept, 0], torch.from_numpy(index + 1)[kept])
        dropped.append(1 - kept.float().mean().item())
    assert 0.35 < np.mean(dropped) < 0.65


def test_training_batches_draw_examples_in_proportion_to_their_weights() -> None:
    latents, ids = torch.randn(4, 4, 2, 2), torch.zeros(4, 3, dtype=torch.long)
    batches = _Batches(latents, ids, ids[0], seed=0, drop=0.0, weights=np.array([0.0, 1.0, 3.0, 0.0]))
    drawn = np.concatenate([batches(step, 50)[0] for step in range(40)])
    assert set(drawn) == {1, 2}
    assert 0.7 < np.mean(drawn == 2) < 0.8
    for bad in (np.ones(3), np.array([1.0, -1.0, 1.0, 1.0]), np.zeros(4)):
        with pytest.raises(ValueError, match="weights must be 4 non-negative numbers"):
            _Batches(latents, ids, ids[0], seed=0, drop=0.0, weights=bad)


def test_min_snr_weights_damp_only_the_low_noise_steps() -> None:
    noise_scheduler = DDPMScheduler(**BETAS)
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    weights = min_snr_weights(noise_scheduler, gamma=5.0)
    assert weights.shape == (1000,)
    noisy = snr <= 5.0
    assert 0 < noisy.sum() < 1000
    assert torch.equal(weights[noisy], torch.ones(int(noisy.sum())))
    assert weights[~noisy] == pytest.approx(5.0 / snr[~noisy])
    assert torch.all(weights[1:] >= weights[:-1])  # less noise, less weight
    with pytest.raises(ValueError, match="snr_gamma must be positive"):
        min_snr_weights(noise_scheduler, gamma=0.0)
