"""The motion stage: an AnimateDiff ``MotionAdapter`` on the frozen tiny-shapes model.

The image UNet stays as it is: it runs as the spatial half of
``UNetMotionModel.from_unet2d(unet, adapter)`` and only the adapter's temporal attention trains
in it, so the image student's LinFusion weights still fit. The captions' motion words ("moving",
"up", "down", "standing", "still") are new tokens: the text encoder gets rows for them at the end
of its embedding table. Direction can reach the frozen UNet only through its cross-attention, so
the video model's text encoder (its own copy) fine-tunes too: its new rows fast, its layers
slowly, its old rows not at all. A motion module's output projection starts at zero, so
training starts from the image model applied to every frame.

Clips (:mod:`lindiff.data.motion`) are rendered and encoded once. Every batch is drawn from
``(seed, step)``; half of its clips run backwards in time with the motions of their caption
reversed (a clip of a star moving left, played backwards, is a star moving right), which doubles
the clips for free and is exact in latent space.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from lindiff.data.motion import (
    MotionConfig,
    format_motion_caption,
    parse_motion_caption,
    render_clip,
    sample_clip,
)

from . import architectures
from .denoiser import token_ids
from .loop import train

REVERSED = {"left": "right", "right": "left", "up": "down", "down": "up", "still": "still"}
"""The motion a clip shows when played backwards."""

SIMILAR_WORDS = {"up": "above", "down": "below"}
"""New tokens whose embedding starts at an existing word's; the others start at the mean row."""


def reversed_caption(caption: str) -> str:
    """The caption of the clip played backwards."""
    spec = parse_motion_caption(caption)
    return format_motion_caption(replace(spec, motions=tuple(REVERSED[m] for m in spec.motions)))


@torch.no_grad()
def encode_clips(
    vae: AutoencoderKL,
    count: int,
    seed: int,
    frames: int,
    config: MotionConfig,
    device: torch.device,
    clips_per_batch: int = 16,
) -> dict[str, torch.Tensor | list[str]]:
    """Render and encode ``count`` clips of seeds ``seed, seed + 1, ...``.

    Returns ``latents`` ``float32 (count, 4, frames, S/8, S/8)`` (scaled latent means) and
    their ``captions``.
    """
    vae = vae.to(device).eval()
    latents, captions = [], []
    for start in tqdm(range(0, count, clips_per_batch), desc="motion clips", mininterval=5.0):
        clips = [
            sample_clip(seed + index, frames, architectures.NATIVE_SIZE, config)
            for index in range(start, min(start + clips_per_batch, count))
        ]
        pixels = np.stack([np.asarray(frame) for clip in clips for frame in render_clip(clip)])
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(device)
        mean = vae.encode(images).latent_dist.mean.mul(vae.config.scaling_factor).cpu()
        latents.append(mean.unflatten(0, (len(clips), frames)).transpose(1, 2))
        captions.extend(clip.caption for clip in clips)
    vae.cpu()
    return {"latents": torch.cat(latents), "captions": captions}


def extend_text_encoder(text_encoder: CLIPTextModel, old: CLIPTokenizer, new: CLIPTokenizer) -> CLIPTextModel:
    """``text_encoder`` with rows for the tokens ``new`` adds to ``old`` (which it must extend)."""
    rows = text_encoder.get_input_embeddings().weight.data
    if len(old) != rows.shape[0] or any(new.get_vocab().get(t) != i for t, i in old.get_vocab().items()):
        raise ValueError(
            "new must extend old's vocabulary, and old must match the text encoder's embedding table"
        )
    text_encoder.resize_token_embeddings(len(new))
    table = text_encoder.get_input_embeddings().weight.data
    vocab = new.get_vocab()
    for token, index in vocab.items():
        if index < rows.shape[0]:
            continue
        similar = SIMILAR_WORDS.get(token.removesuffix("</w>"))
        table[index] = rows[vocab[similar + "</w>"]] if similar else rows.mean(dim=0)
    return text_encoder


def zero_motion_outputs(adapter: MotionAdapter) -> None:
    """Zero every motion module's output projection, so the adapter starts as the identity."""
    for name, module in adapter.named_modules():
        if name.endswith("proj_out") and isinstance(module, torch.nn.Linear):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)


class _ClipBatches:
    """Batch ``step`` of clip latents, caption ids (half reversed in time, 10% empty) and noise.

    Timesteps are uniform over the training schedule.
    """

    def __init__(
        self,
        latents: torch.Tensor,
        ids: torch.Tensor,
        reversed_ids: torch.Tensor,
        empty: torch.Tensor,
        seed: int,
    ):
        self.latents, self.ids, self.reversed_ids, self.empty, self.seed = (
            latents,
            ids,
            reversed_ids,
            empty,
            seed,
        )
        self.noise_scheduler = DDPMScheduler(**architectures.BETAS)

    def __call__(
        self, step: int, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, step))
        generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
        index = torch.from_numpy(rng.integers(len(self.latents), size=batch_size))
        backwards = torch.from_numpy(rng.random(batch_size) < 0.5)
        latents = self.latents[index].clone()
        latents[backwards] = latents[backwards].flip(2)
        ids = torch.where(backwards[:, None], self.reversed_ids[index], self.ids[index])
        ids[torch.from_numpy(rng.random(batch_size) < 0.1)] = self.empty
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator
        )
        return ids, self.noise_scheduler.add_noise(latents, noise, t), t, noise


def train_motion(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    data: dict[str, torch.Tensor | list[str]],
    tokenizer: CLIPTokenizer,
    first_new_token: int,
    work_dir: Path,
    *,
    steps: int,
    cooldown: int = 0,
    batch_size: int = 4,
    lr: float = 1e-3,
    text_lr: float = 1e-4,
    embedding_lr: float = 5e-3,
    seed: int = 0,
    device: torch.device,
) -> tuple[MotionAdapter, CLIPTextModel]:
    """Train a motion adapter and ``text_encoder`` on epsilon prediction.

    ``unet`` (frozen) is the image model; ``text_encoder`` already has rows for every token of
    ``tokenizer`` (:func:`extend_text_encoder`); its layers train at ``text_lr`` and its new rows
    (from ``first_new_token`` on) at ``embedding_lr``, the old rows stay. ``data`` comes from
    :func:`encode_clips`.
    """
    torch.manual_seed(seed)
    adapter = architectures.motion_adapter()
    zero_motion_outputs(adapter)
    model = torch.nn.ModuleDict(
        {"unet": UNetMotionModel.from_unet2d(unet, adapter), "text_encoder": text_encoder}
    ).to(device)
    model.requires_grad_(False)
    motion = [p for name, p in model["unet"].named_parameters() if "motion_modules" in name]
    for parameter in motion:
        parameter.requires_grad_(True)
    text_encoder.requires_grad_(True)
    table = text_encoder.get_input_embeddings().weight
    new_rows = torch.zeros(table.shape[0], 1, device=table.device)
    new_rows[first_new_token:] = 1.0
    table.register_hook(lambda grad: grad * new_rows)
    layers = [p for p in text_encoder.parameters() if p is not table]
    optim = torch.optim.AdamW(
        [
            {"params": motion, "lr": lr, "weight_decay": 0.01},
            {"params": layers, "lr": text_lr, "weight_decay": 0.01},
            {"params": [table], "lr": embedding_lr, "weight_decay": 0.0},
        ]
    )
    captions = data["captions"]
    batches = _ClipBatches(
        data["latents"],
        token_ids(tokenizer, captions),
        token_ids(tokenizer, [reversed_caption(c) for c in captions]),
        token_ids(tokenizer, [""])[0],
        seed,
    )
    frames = data["latents"].shape[2]

    def step(i: int) -> torch.Tensor:
        ids, noisy, t, noise = batches(i, batch_size)
        text = model["text_encoder"](ids.to(device)).last_hidden_state.repeat_interleave(frames, dim=0)
        prediction = model["unet"](noisy.to(device), t.to(device), text).sample
        return F.mse_loss(prediction, noise.to(device))

    train("motion", work_dir, model, optim, step, steps, warmup=100, cooldown=cooldown)
    model.cpu().eval()
    trained = architectures.motion_adapter()
    trained.load_state_dict({k: v for k, v in model["unet"].state_dict().items() if "motion_modules" in k})
    return trained, model["text_encoder"]
