"""The "clear" and "lit" methods against dense references built here, and on tiny models.

Mixer tests call the method's TokenMixer directly with random ``q, k, v`` ``(B, N, H, D)`` and a
hand-made token grid; model tests convert the tiny FLUX, SD3, PixArt transformers and a UNet.
"""

from __future__ import annotations

import json
import math

import pytest
import tiny_dit_models as tiny
import tiny_models
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import lindiff
from lindiff.attention import LayerInfo, create_method
from lindiff.attention.base import Tokens
from lindiff.attention.clear import ClearAttention, pool_tokens
from lindiff.attention.lit import LiTAttention
from lindiff.grid import TokenGrid
from lindiff.kernels import linear_attention
from lindiff.state import get_state

HEADS, DIM = 4, 8


def make_tokens(grid: tuple[int, int, int], before: int = 0, after: int = 0) -> tuple[Tokens, int]:
    """Tokens with ``before`` text tokens, the image tokens of ``grid``, then ``after`` text tokens."""
    source = TokenGrid()
    source.set_tokens(*grid)
    image = math.prod(grid)
    return Tokens(image=slice(before, before + image), source=source), before + image + after


def qkv(n: int, batch: int = 2, dtype=torch.float64) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(batch, n, HEADS, DIM, dtype=dtype) for _ in range(3))


def grid_squared_distances(grid: tuple[int, int, int]) -> torch.Tensor:
    """``(N, N)`` integer squared distances between the grid's cells (row-major)."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1).reshape(-1, 3)
    return (coords[:, None] - coords[None]).pow(2).sum(-1)


def masked_softmax(q, k, v, mask):
    """Dense softmax attention ``(B, N, H, D)`` with a ``(N_q, N_k)`` bool mask, scale 1/sqrt(D)."""
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) * q.shape[-1] ** -0.5
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("bhnm,bmhe->bnhe", weights, v)


def clear_reference(q, k, v, tokens, radius, pooled=None, frames_radius=None):
    """CLEAR with an explicit mask: image queries see their strict window ``d < radius`` within a
    frame (a radius that is a grid distance up to float rounding, like ``math.sqrt(2)``, counts as
    that distance) in the frames within ``frames_radius`` (inclusive; ``None``: every frame), the
    text and the pooled tokens ``(k_p, v_p)``; text queries see every (unpooled) token."""
    n, image = q.shape[1], tokens.image
    frames, height, width = tokens.grid
    mask = torch.ones(n, n, dtype=torch.bool)
    in_frame = grid_squared_distances((1, height, width)) < round(radius * radius, 9)
    frame = torch.arange(frames)
    near = (frame[:, None] - frame[None]).abs() <= (math.inf if frames_radius is None else frames_radius)
    mask[image, image] = torch.kron(near.long(), in_frame.long()).bool()
    if pooled is not None:
        extra = torch.zeros(n, pooled[0].shape[1], dtype=torch.bool)
        extra[image] = True
        mask = torch.cat([mask, extra], dim=1)
        k, v = torch.cat([k, pooled[0]], 1), torch.cat([v, pooled[1]], 1)
    return masked_softmax(q, k, v, mask)


def pool_reference(x, grid, kernel):
    """Pool with conv2d: edge-replicated to a multiple of f, one kernel for every channel."""
    batch, _, heads, dim = x.shape
    frames, height, width = grid
    f = kernel.shape[-1]
    planes = x.reshape(batch * frames, height, width, heads * dim).permute(0, 3, 1, 2)
    planes = F.pad(planes, (0, -width % f, 0, -height % f), mode="replicate")
    weight = kernel.to(x.dtype).expand(heads * dim, 1, f, f)
    out = F.conv2d(planes, weight, stride=f, groups=heads * dim)
    return out.permute(0, 2, 3, 1).reshape(batch, -1, heads, dim)


@pytest.mark.parametrize("before, after", [(0, 0), (3, 0), (0, 5), (3, 4)])
@pytest.mark.parametrize("radius", [math.hypot(4, 6) + 1e-3, math.inf])
def test_clear_radius_beyond_diagonal_is_full_softmax(before, after, radius):
    tokens, n = make_tokens((1, 5, 7), before, after)
    q, k, v = qkv(n)
    out = ClearAttention(radius, None)(q, k, v, tokens)
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("grid", [(1, 6, 5), (2, 3, 4)])
@pytest.mark.parametrize("radius", [0.5, 1, math.sqrt(2), math.sqrt(5), 2.5, 3])
@pytest.mark.parametrize("before, after", [(0, 0), (2, 3)])
def test_clear_window_equals_masked_softmax(grid, radius, before, after):
    """The window is strict (CLEAR's ``d < radius``), also at radii that are grid distances."""
    tokens, n = make_tokens(grid, before, after)
    q, k, v = qkv(n)
    out = ClearAttention(radius, None)(q, k, v, tokens)
    torch.testing.assert_close(out, clear_reference(q, k, v, tokens, radius), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("frames_radius", [None, 0, 1, 1.5, 2, math.inf])
@pytest.mark.parametrize("radius", [1, math.sqrt(2), 2.5])
def test_clear_video_window_is_a_cylinder(frames_radius, radius):
    """On video the window is CLEAR's strict disc in each frame within ``frames_radius`` frames
    (inclusive; ``None``: every frame), with text and pooled tokens global."""
    grid = (4, 3, 4)
    tokens, n = make_tokens(grid, 2, 3)
    q, k, v = qkv(n)
    mixer = ClearAttention(radius, 2, frames_radius=frames_radius).double()
    image = tokens.image
    pooled = tuple(pool_tokens(x[:, image], grid, mixer.spatial_weight) for x in (k, v))
    expected = clear_reference(q, k, v, tokens, radius, pooled, frames_radius)
    torch.testing.assert_close(mixer(q, k, v, tokens), expected, rtol=1e-10, atol=1e-12)
    if frames_radius is not None and frames_radius < grid[0] - 1:  # fewer frames than the clip
        assert not torch.allclose(expected, clear_reference(q, k, v, tokens, radius, pooled))


@pytest.mark.parametrize("grid, factor", [((1, 6, 8), 2), ((1, 5, 7), 2), ((2, 4, 7), 3)])
def test_pooled_tokens_start_as_average_pooling(grid, factor):
    x = torch.randn(2, math.prod(grid), HEADS, DIM, dtype=torch.float64)
    mixer = ClearAttention(2, factor).double()
    assert mixer.spatial_weight.shape == (factor, factor)
    torch.testing.assert_close(mixer.spatial_weight, torch.full_like(mixer.spatial_weight, factor**-2))
    pooled = pool_tokens(x, grid, mixer.spatial_weight)
    cells = grid[0] * math.ceil(grid[1] / factor) * math.ceil(grid[2] / factor)
    assert pooled.shape == (2, cells, HEADS, DIM)
    if grid[1] % factor == 0 and grid[2] % factor == 0:
        planes = x.reshape(2, *grid[1:], -1).permute(0, 3, 1, 2)
        average = F.avg_pool2d(planes, factor).permute(0, 2, 3, 1).reshape(pooled.shape)
        torch.testing.assert_close(pooled, average)
    torch.testing.assert_close(pooled, pool_reference(x, grid, mixer.spatial_weight))


@pytest.mark.parametrize("grid", [(1, 6, 8), (1, 5, 7)])
@pytest.mark.parametrize("before, after", [(0, 0), (3, 2)])
def test_clear_with_pooled_tokens_equals_dense_reference(grid, before, after):
    tokens, n = make_tokens(grid, before, after)
    q, k, v = qkv(n)
    mixer = ClearAttention(1.5, 2).double()
    with torch.no_grad():
        mixer.spatial_weight.normal_(0.25, 0.1)  # as if trained: no longer the average
    image = tokens.image
    pooled = tuple(pool_reference(t[:, image], grid, mixer.spatial_weight) for t in (k, v))
    out = mixer(q, k, v, tokens)
    torch.testing.assert_close(out, clear_reference(q, k, v, tokens, 1.5, pooled), rtol=1e-10, atol=1e-12)


def lit_reference(q, k, v, tokens, heads, conv, eps):
    """Few-head ReLU linear attention written as an N x N matrix, plus the depthwise conv of the image values."""
    b, n, h, _ = q.shape
    fq, fk = (F.relu(t.reshape(b, n, heads, -1)) for t in (q, k))
    scores = torch.einsum("bnhd,bmhd->bhnm", fq, fk) / n  # mean over the keys
    num = torch.einsum("bhnm,bmhe->bnhe", scores, v.reshape(b, n, heads, -1))
    out = (num / (scores.sum(-1).transpose(1, 2)[..., None] + eps)).reshape(b, n, h, -1)
    frames, height, width = tokens.grid
    planes = v[:, tokens.image].reshape(b * frames, height, width, -1).permute(0, 3, 1, 2)
    local = F.conv2d(
        planes, conv.weight.detach(), conv.bias.detach(), padding=conv.padding, groups=planes.shape[1]
    )
    out[:, tokens.image] += local.permute(0, 2, 3, 1).reshape(b, -1, h, v.shape[-1])
    return out


@pytest.mark.parametrize("heads", [1, 2, 8])
@pytest.mark.parametrize("grid, before, after", [((1, 5, 6), 0, 0), ((1, 4, 7), 3, 0), ((2, 3, 5), 2, 4)])
def test_lit_equals_formula(heads, grid, before, after):
    tokens, n = make_tokens(grid, before, after)
    q, k, v = qkv(n)
    mixer = LiTAttention(HEADS * DIM, heads, 5, 1e-4).double()
    with torch.no_grad():
        mixer.dwc.weight.normal_(0, 0.2)
        mixer.dwc.bias.normal_(0, 0.2)
    out = mixer(q, k, v, tokens)
    torch.testing.assert_close(
        out, lit_reference(q, k, v, tokens, heads, mixer.dwc, 1e-4), rtol=1e-9, atol=1e-11
    )


def test_lit_starts_as_pure_linear_attention_that_does_not_drift_with_resolution():
    mixer = LiTAttention(HEADS * DIM, 2, 5, 1e-4).double()
    assert not mixer.dwc.weight.any() and not mixer.dwc.bias.any()
    tokens, n = make_tokens((1, 6, 6), 2, 0)
    q, k, v = qkv(n)
    regroup = lambda t: t.reshape(2, n, 2, -1)
    expected = linear_attention(
        regroup(q), regroup(k), regroup(v), feature_map="relu", eps=1e-4, kv_scale="mean"
    )
    torch.testing.assert_close(mixer(q, k, v, tokens), expected.reshape(v.shape))
    # Mean normalisation: a constant image gives the same output at every resolution.
    token = torch.randn(3, 1, HEADS, DIM, dtype=torch.float64)
    outputs = []
    for side in (4, 16, 64):
        tokens, n = make_tokens((1, side, side))
        outputs.append(mixer(*(t[:1].expand(1, n, -1, -1) for t in token), tokens)[0, 0])
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0])


def test_gradients_reach_the_new_parameters():
    tokens, n = make_tokens((1, 6, 5), 3, 2)
    for mixer in (ClearAttention(1.5, 2), LiTAttention(HEADS * DIM, 2, 5, 1e-4)):
        q, k, v = (t.requires_grad_() for t in qkv(n, dtype=torch.float32))
        out = mixer(q, k, v, tokens)
        params = list(mixer.parameters())
        grads = torch.autograd.grad(out, [q, k, v, *params], torch.randn_like(out))
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads), type(mixer).__name__


@pytest.mark.parametrize("method", ["clear", "lit"])
def test_resolution_changes_reuse_one_layer(method):
    """One mixer, one TokenGrid, three calls at different grids: each matches its reference."""
    mixer = (
        ClearAttention(2, 2).double() if method == "clear" else LiTAttention(HEADS * DIM, 2, 3, 1e-4).double()
    )
    with torch.no_grad():
        for param in mixer.parameters():
            param.normal_(0.2, 0.1)
    source = TokenGrid()
    for grid in [(1, 6, 4), (1, 9, 11), (1, 6, 4)]:
        source.set_tokens(*grid)
        image = math.prod(grid)
        tokens = Tokens(image=slice(2, 2 + image), source=source)
        q, k, v = qkv(image + 2)
        if method == "clear":
            pooled = tuple(pool_reference(t[:, tokens.image], grid, mixer.spatial_weight) for t in (k, v))
            ref = clear_reference(q, k, v, tokens, 2, pooled)
        else:
            ref = lit_reference(q, k, v, tokens, 2, mixer.dwc, 1e-4)
        torch.testing.assert_close(mixer(q, k, v, tokens), ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_close_to_float32(dtype):
    tokens, n = make_tokens((1, 6, 7), 3, 1)
    q, k, v = qkv(n, dtype=torch.float32)
    for mixer in (ClearAttention(2, 2), LiTAttention(HEADS * DIM, 2, 5, 1e-4)):
        expected = mixer(q, k, v, tokens)
        out = mixer.to(dtype)(*(t.to(dtype) for t in (q, k, v)), tokens)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    "method, options, match",
    [
        ("clear", {"radius": -1}, r"radius must be a number > 0.*got -1"),
        ("clear", {"radius": 0}, r"radius must be a number > 0.*got 0"),
        ("clear", {"radius": "16"}, r"radius must be a number > 0.*got '16'"),
        ("clear", {"down_factor": 0}, r"down_factor must be None or an integer >= 1.*got 0"),
        ("clear", {"down_factor": 2.5}, r"down_factor must be None or an integer >= 1.*got 2.5"),
        ("clear", {"train_tokens": 1}, r"train_tokens must be None .* or an integer >= 2 .*got 1"),
        ("clear", {"train_tokens": 4608.0}, r"train_tokens must be None .*got 4608.0"),
        (
            "clear",
            {"frames_radius": -1},
            r"frames_radius must be None \(every frame\) or a number >= 0.*got -1",
        ),
        ("clear", {"frames_radius": math.nan}, r"frames_radius must be None .*got nan"),
        ("clear", {"frames_radius": "2"}, r"frames_radius must be None .*got '2'"),
        ("clear", {"frames_radius": False}, r"frames_radius must be None .*got False"),
        (
            "clear",
            {"window": 3},
            r"unknown option\(s\) \['window'\].*allowed: \['down_factor', 'frames_radius', 'radius', 'train_tokens'\]",
        ),
        ("lit", {"heads": 0}, r"heads must be an integer >= 1, got 0"),
        ("lit", {"kernel_size": 4}, r"kernel_size must be an odd integer >= 1 \(1, 3, 5, ...\), got 4"),
        ("lit", {"kernel_size": True}, r"kernel_size must be an odd integer"),
        ("lit", {"eps": -1.0}, r"eps must be a non-negative number, got -1.0"),
    ],
)
def test_bad_options_name_the_option_and_allowed_values(method, options, match):
    with pytest.raises(ValueError, match=match):
        create_method(method, **options)


def test_lit_heads_must_divide_the_layer_width():
    model = tiny.pixart_transformer()  # width 16
    method = create_method("lit", heads=3)
    layer = LayerInfo("transformer_blocks.0.attn1", model.transformer_blocks[0].attn1, "self", TokenGrid())
    with pytest.raises(
        ValueError, match=r"heads=3 must divide the query/key width 16 and the value width 16"
    ):
        method.convert_layer(layer)


# --- converted tiny models ---------------------------------------------------------------------

LATENT = (12, 20)  # non-square latent: a 6 x 10 token grid in the DiTs (2x2 patches)


def unet_inputs(height: int, width: int, batch: int = 1) -> dict:
    generator = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(batch, 4, height, width, generator=generator),
        "timestep": torch.full((batch,), 500),
        "encoder_hidden_states": torch.randn(batch, 7, tiny_models.TEXT_DIM, generator=generator),
    }


# builder, inputs at a latent size, diagonal of the finest token grid at LATENT
MODELS = {
    "flux": (tiny.flux_transformer, tiny.flux_inputs, math.hypot(5, 9)),
    "sd3": (tiny.sd3_transformer, tiny.sd3_inputs, math.hypot(5, 9)),
    "sd3.5": (lambda: tiny.sd3_transformer(dual_attention=True), tiny.sd3_inputs, math.hypot(5, 9)),
    "pixart": (tiny.pixart_transformer, tiny.pixart_inputs, math.hypot(5, 9)),
    "unet": (tiny_models.unet, unet_inputs, math.hypot(11, 19)),  # two levels: 12 x 20 and 6 x 10
}


def outputs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_clear_with_radius_beyond_the_diagonal_reproduces_the_model(name):
    """The converted model's own plumbing (text placement, q/k norms, FLUX RoPE) is untouched:
    with a window covering the grid (strictly: beyond the diagonal), CLEAR is the original
    softmax attention."""
    build, make_inputs, diagonal = MODELS[name]
    model = build()
    inputs = make_inputs(*LATENT, batch=2)
    reference = outputs(model, inputs)

    lindiff.linearize(model, method="clear", radius=diagonal + 1e-3)
    assert {type(attn.lindiff) for attn in get_state(model).layers.values()} == {ClearAttention}
    torch.testing.assert_close(outputs(model, inputs), reference, rtol=1e-5, atol=1e-5)
    lindiff.restore(model)
    lindiff.linearize(model, method="clear", radius=diagonal)
    assert (outputs(model, inputs) - reference).abs().max() > 1e-6  # the strict window cuts the corners
    lindiff.restore(model)
    lindiff.linearize(model, method="clear", radius=1)
    assert (outputs(model, inputs) - reference).abs().max() > 1e-3  # the window does cut attention


@pytest.mark.parametrize("method, options", [("clear", {"down_factor": 2}), ("lit", {})])
def test_restore_is_bit_identical_after_training(method, options):
    model = tiny.flux_transformer()
    inputs = tiny.flux_inputs(*LATENT)
    reference = outputs(model, inputs)
    lindiff.linearize(model, method=method, **options)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lindiff." in name:
                param.add_(torch.randn_like(param) * 0.1)
    assert not torch.equal(outputs(model, inputs), reference)
    lindiff.restore(model)
    assert not any(".lindiff." in name for name, _ in model.named_parameters())
    assert torch.equal(outputs(model, inputs), reference)


def test_save_and_load_learned_pooling_kernels(tmp_path):
    model = lindiff.linearize(tiny.sd3_transformer(), method="clear", radius=2, down_factor=2)
    with torch.no_grad():
        for attn in get_state(model).layers.values():
            attn.lindiff.spatial_weight.normal_(0.25, 0.1)
    inputs = tiny.sd3_inputs(*LATENT)
    trained = outputs(model, inputs)
    lindiff.save_weights(model, tmp_path)

    fresh = lindiff.linearize(tiny.sd3_transformer(), method="clear", weights=tmp_path)
    assert get_state(fresh).method.options_dict() == {
        "radius": 2,
        "down_factor": 2,
        "train_tokens": None,
        "frames_radius": None,
    }
    for name, attn in get_state(fresh).layers.items():
        torch.testing.assert_close(
            attn.lindiff.spatial_weight, get_state(model).layers[name].lindiff.spatial_weight, rtol=0, atol=0
        )
    assert torch.equal(outputs(fresh, inputs), trained)


def test_frames_radius_is_saved_and_older_files_load_without_it(tmp_path):
    """``frames_radius`` is recorded with the other options (config, model card); files written
    before it existed load with its default (every frame)."""
    model = lindiff.linearize(tiny.sd3_transformer(), method="clear", radius=2, frames_radius=3)
    weights = lindiff.save_weights(model, tmp_path / "new")
    assert json.loads((tmp_path / "new" / "lindiff.json").read_text())["options"]["frames_radius"] == 3
    assert "| frames_radius | 3 |" in (tmp_path / "new" / "README.md").read_text()
    fresh = lindiff.linearize(tiny.sd3_transformer(), method="clear", weights=tmp_path / "new")
    assert get_state(fresh).method.options.frames_radius == 3

    with safe_open(str(weights), framework="pt") as f:
        config = json.loads(f.metadata()["lindiff_config"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    del config["options"]["frames_radius"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"lindiff_config": json.dumps(config)})
    old = lindiff.linearize(tiny.sd3_transformer(), method="clear", weights=tmp_path / "old.safetensors")
    assert get_state(old).method.options_dict() == {
        "radius": 2,
        "down_factor": None,
        "train_tokens": None,
        "frames_radius": None,
    }
