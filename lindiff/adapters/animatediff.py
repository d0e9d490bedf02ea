"""AnimateDiff: an SD-style image UNet with motion modules (``UNetMotionModel``).

diffusers builds it as ``UNetMotionModel.from_unet2d(unet, MotionAdapter(...))`` inside
``AnimateDiffPipeline``: the image UNet's layers, under their own module paths, with a motion
module (``AnimateDiffTransformer3D``: softmax attention over the frames at each pixel) after each
spatial transformer.
"""

from __future__ import annotations

from typing import Any

from diffusers import UNetMotionModel
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from torch import nn

from ..attention.base import LayerInfo
from ..grid import TokenGrid
from .base import VideoAdapter, attn1_layers, tensor_argument


class AnimateDiffAdapter(VideoAdapter):
    """``UNetMotionModel`` (AnimateDiff text-to-video): the spatial ``attn1`` of every level is
    converted; the motion modules' attention (over frames) stays softmax.

    Layers: every ``attn1`` outside the motion modules, at the module paths of the image UNet it
    was built from, so the image UNet's weights (family ``"unet"``, :attr:`weights_family`) load
    unchanged, and weights saved here load into the image UNet.

    Grid: ``sample`` is ``(B, C, F, H, W)``, and the spatial layers see each frame on its own
    (frames folded into the batch, ``(B * F, H * W, C)``), so the grid is the image UNet's: the
    latent ``(1, H, W)``, halved once per level (per-frame spatial attention, as in the image model).

    Frames: any count from 1 (the VAE is per frame) up to the motion modules' positional length
    (``config.motion_max_seq_length``), or any count once FreeNoise
    (``pipe.enable_free_noise()``) runs the motion modules over windows. Sizes and the native size
    are the image UNet's. ``AnimateDiffVideoToVideoPipeline`` refines the videos of
    ``AnimateDiffPipeline``. Distillation is the image UNet's: train the ``"unet"`` family on the
    image pipeline and load the weights here.
    """

    name = "animatediff"
    role = "unet"
    models = (UNetMotionModel,)
    weights_family = "unet"
    frame_rate = 8

    def layers(self, model: nn.Module, grid: TokenGrid) -> list[LayerInfo]:
        temporal = {
            id(module)
            for motion in model.modules()
            if isinstance(motion, AnimateDiffTransformer3D)
            for module in motion.modules()
        }
        return [layer for layer in attn1_layers(model, grid) if id(layer.module) not in temporal]

    def record_grid(self, grid: TokenGrid, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = tensor_argument(args, kwargs, "sample", 0)
        if sample.ndim != 5:
            raise ValueError(
                f"expected the UNetMotionModel's sample as (B, C, F, H, W), got shape {tuple(sample.shape)}"
            )
        grid.update(height=sample.shape[-2], width=sample.shape[-1])

    def spatial_factor(self, pipe: Any) -> int:
        return int(pipe.vae_scale_factor)

    def max_frames(self, pipe: Any) -> int | None:
        """The most frames ``pipe`` renders: its motion modules' ``motion_max_seq_length``, or
        ``None`` (no limit) while FreeNoise is enabled."""
        if getattr(pipe, "free_noise_enabled", False):
            return None
        return int(pipe.unet.config.motion_max_seq_length)

    def resolve_frames(self, pipe: Any, num_frames: int | None) -> int | None:
        """As :meth:`ModelAdapter.resolve_frames`, at most :meth:`max_frames` (the default too).

        Raises:
            ValueError: also for more frames than the motion modules take.
        """
        frames = super().resolve_frames(pipe, num_frames)
        limit = None if frames is None else self.max_frames(pipe)
        if limit is None or frames <= limit:
            return frames
        if num_frames is None:
            return limit
        raise ValueError(
            f"frames={num_frames!r}: the motion modules of {type(pipe).__name__} take at most {limit} "
            f"frames (motion_max_seq_length of its UNetMotionModel); render 1 to {limit} frames, or "
            "enable FreeNoise (pipe.enable_free_noise()) for longer videos"
        )

    def video_to_video(self, pipe: Any) -> type | None:
        """``AnimateDiffVideoToVideoPipeline`` for a text-to-video ``AnimateDiffPipeline``."""
        # Pipelines import transformers: lazily.
        from diffusers import AnimateDiffPipeline, AnimateDiffVideoToVideoPipeline

        return AnimateDiffVideoToVideoPipeline if isinstance(pipe, AnimateDiffPipeline) else None
