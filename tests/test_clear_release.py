"""Released CLEAR checkpoints (FLUX layout, no metadata) load into lindiff's "clear" method, and
lindiff writes that layout back.

The reference here is an independent transcription of CLEAR's processor: FLUX projections, q/k
RMS norms and RoPE, then one dense softmax over ``[text, image, pooled]`` keys with an explicit
mask (text queries: text + image keys; image queries: text keys, image keys strictly within the
window, pooled keys), pooled keys/values as CLEAR lays them out, ``(B, heads, H/f, f, W/f, f, D)``
times ``spatial_weight`` ``(1, 1, 1, f, 1, f, 1)`` summed over both ``f`` axes.
"""

from __future__ import annotations

import copy
import math

import pytest
import tiny_dit_models as tiny
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from safetensors.torch import load_file, save_file

import lindiff
from lindiff.clear_format import save_clear_weights
from lindiff.state import base_linear, get_state

LATENT = (12, 16)  # a 6 x 8 token grid: both sides divisible by the pooling factor 2
GRID = (LATENT[0] // 2, LATENT[1] // 2)
LAYERS = [f"transformer_blocks.{i}.attn" for i in range(2)] + [
    f"single_transformer_blocks.{i}.attn" for i in range(2)
]


def write_clear_file(path, model, factor=None, seed=7, noise=0.1):
    """A CLEAR-layout file for ``model``'s layers: its projections plus ``noise``, and random
    positive ``spatial_weight`` ``(1, 1, 1, f, 1, f, 1)`` if ``factor``. Returns the tensors."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in LAYERS:
        attn = model.get_submodule(layer)
        projections = ["to_q", "to_k", "to_v"] + (["to_out.0"] if layer.startswith("transformer") else [])
        for projection in projections:
            for name, param in attn.get_submodule(projection).named_parameters():
                tensors[f"{layer}.{projection}.{name}"] = (
                    param.detach() + noise * torch.randn(param.shape, generator=generator)
                ).contiguous()
        if factor:
            shape = (1, 1, 1, factor, 1, factor, 1)
            tensors[f"{layer}.processor.spatial_weight"] = torch.rand(shape, generator=generator) * 0.5
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path)
    return tensors


def clear_attention(q, k, v, num_text, radius, spatial_weight, train_tokens):
    """CLEAR's attention, densely: ``q, k, v`` ``(B, N, heads, D)``, text first; returns ``(B, N, heads, D)``."""
    batch, n, heads, dim = q.shape
    height, width = GRID
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    squared = (rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2
    mask = torch.ones(n, n, dtype=torch.bool)
    mask[num_text:, num_text:] = squared < radius**2
    keys, values, num_keys = k, v, n
    if spatial_weight is not None:
        f = spatial_weight.shape[3]

        def pool(x):
            image = x[:, :, num_text:].reshape(batch, heads, height // f, f, width // f, f, dim)
            return (image * spatial_weight).sum(dim=(3, 5)).reshape(batch, heads, -1, dim)

        keys, values = torch.cat([k, pool(k)], 2), torch.cat([v, pool(v)], 2)
        pooled = torch.zeros(n, keys.shape[2] - n, dtype=torch.bool)
        pooled[num_text:] = True
        mask = torch.cat([mask, pooled], 1)
        num_keys = 10 * n
    scale = dim**-0.5 if train_tokens is None else math.sqrt(math.log(num_keys, train_tokens) / dim)
    scores = (q @ keys.transpose(-1, -2)) * scale
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ values
    return out.transpose(1, 2)


class ClearReferenceProcessor:
    """A FLUX attention processor computing CLEAR with the projections of a CLEAR file."""

    def __init__(self, tensors, layer, radius, train_tokens=None):
        self.tensors, self.layer = tensors, layer
        self.radius, self.train_tokens = radius, train_tokens

    def linear(self, name, x):
        return F.linear(
            x, self.tensors[f"{self.layer}.{name}.weight"], self.tensors[f"{self.layer}.{name}.bias"]
        )

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        def heads(x):
            return x.unflatten(-1, (-1, attn.head_dim))

        q = attn.norm_q(heads(self.linear("to_q", hidden_states)))
        k = attn.norm_k(heads(self.linear("to_k", hidden_states)))
        v = heads(self.linear("to_v", hidden_states))
        if encoder_hidden_states is not None:
            text = encoder_hidden_states
            q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(text))), q], 1)
            k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(text))), k], 1)
            v = torch.cat([heads(attn.add_v_proj(text)), v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        num_text = q.shape[1] - GRID[0] * GRID[1]
        weight = self.tensors.get(f"{self.layer}.processor.spatial_weight")
        out = clear_attention(q, k, v, num_text, self.radius, weight, self.train_tokens).flatten(2)
        if encoder_hidden_states is None:
            return out
        return self.linear("to_out.0", out[:, num_text:]), attn.to_add_out(out[:, :num_text])


def reference_model(model, tensors, radius, train_tokens=None):
    """A copy of the unconverted ``model`` whose layers run :class:`ClearReferenceProcessor`."""
    reference = copy.deepcopy(model)
    for layer in LAYERS:
        reference.get_submodule(layer).set_processor(
            ClearReferenceProcessor(tensors, layer, radius, train_tokens)
        )
    return reference


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def layer_calls(model, inputs):
    """``{layer: (args, kwargs, output)}`` of each attention layer in one forward pass."""
    calls, handles = {}, []
    for layer in LAYERS:

        def record(module, args, kwargs, out, layer=layer):
            calls[layer] = (args, kwargs, out)

        handles.append(model.get_submodule(layer).register_forward_hook(record, with_kwargs=True))
    run(model, inputs)
    for handle in handles:
        handle.remove()
    return calls


def max_difference(a, b) -> float:
    pairs = zip(a, b, strict=True) if isinstance(a, tuple) else [(a, b)]
    return max((x - y).abs().max().item() for x, y in pairs)


@pytest.mark.parametrize("train_tokens", [None, 20])
@pytest.mark.parametrize("name, radius, factor", [("clear_local_3_down_2", 3, 2), ("clear_local_2", 2, None)])
def test_released_checkpoint_computes_clear(tmp_path, name, radius, factor, train_tokens):
    original = tiny.flux_transformer()
    path = tmp_path / f"{name}.safetensors"
    tensors = write_clear_file(path, original, factor)
    inputs = tiny.flux_inputs(*LATENT, batch=2)
    options = {} if train_tokens is None else {"train_tokens": train_tokens}

    model = lindiff.linearize(copy.deepcopy(original), "clear", weights=path, **options)
    assert get_state(model).method.options_dict() == {
        "radius": radius,
        "down_factor": factor,
        "train_tokens": train_tokens,
        "frames_radius": None,
    }
    reference = reference_model(original, tensors, radius, train_tokens)
    differences = {}
    for layer, (args, kwargs, out) in layer_calls(model, inputs).items():
        with torch.no_grad():
            expected = reference.get_submodule(layer)(*args, **kwargs)
        differences[layer] = max_difference(out, expected)
    differences["transformer"] = max_difference(run(model, inputs), run(reference, inputs))
    print(f"{name} train_tokens={train_tokens}: max |lindiff - CLEAR formula| {differences}")
    assert max(differences.values()) < 2e-5, differences
    assert (run(model, inputs) - run(original, inputs)).abs().max() > 1e-3  # the file did change things


def test_full_window_without_pooling_is_the_original_flux(tmp_path):
    original = tiny.flux_transformer()
    path = tmp_path / "clear_local_16.safetensors"  # 16 > the 6 x 8 grid's diagonal
    write_clear_file(path, original, noise=0)
    inputs = tiny.flux_inputs(*LATENT, batch=2)
    model = lindiff.linearize(copy.deepcopy(original), "clear", weights=path)
    difference = (run(model, inputs) - run(original, inputs)).abs().max().item()
    print(f"full window vs original FLUX: max difference {difference:.3g}")
    torch.testing.assert_close(run(model, inputs), run(original, inputs), rtol=1e-5, atol=1e-5)


def test_options_from_the_caller_and_mismatches(tmp_path):
    original = tiny.flux_transformer()
    named = tmp_path / "clear_local_3_down_2.safetensors"
    tensors = write_clear_file(named, original, factor=2)
    inputs = tiny.flux_inputs(*LATENT)
    expected = run(lindiff.linearize(copy.deepcopy(original), "clear", weights=named), inputs)

    # Explicit options that agree with the name are fine; others conflict.
    lindiff.linearize(copy.deepcopy(original), "clear", weights=named, radius=3, down_factor=2)
    with pytest.raises(ValueError, match=r"options conflict with weights .*radius=4 \(weights have 3\)"):
        lindiff.linearize(copy.deepcopy(original), "clear", weights=named, radius=4)
    with pytest.raises(ValueError, match=r"down_factor=None \(weights have 2\)"):
        lindiff.linearize(copy.deepcopy(original), "clear", weights=named, down_factor=None)
    with pytest.raises(ValueError, match=r"are for method 'clear', but method='lit'"):
        lindiff.linearize(copy.deepcopy(original), "lit", weights=named)

    # A name that does not tell the window: the caller must.
    renamed = tmp_path / "my_clear.safetensors"
    save_file(tensors, renamed)
    with pytest.raises(
        ValueError, match=r"do not record option\(s\) radius \(the file name is not clear_local_"
    ):
        lindiff.linearize(copy.deepcopy(original), "clear", weights=renamed)
    with pytest.raises(ValueError, match=r"down_factor=4 \(weights have 2\)"):
        lindiff.linearize(copy.deepcopy(original), "clear", weights=renamed, radius=3, down_factor=4)
    model = lindiff.linearize(copy.deepcopy(original), "clear", weights=renamed, radius=3)
    assert torch.equal(run(model, inputs), expected)

    # load_weights checks the file against the options the model was linearized with.
    lindiff.load_weights(
        lindiff.linearize(copy.deepcopy(original), "clear", radius=3, down_factor=2), renamed
    )
    pooled = lindiff.linearize(copy.deepcopy(original), "clear", radius=2, down_factor=2)
    with pytest.raises(ValueError, match=r"transformer: linearized with radius=2 \(weights have 3\)"):
        lindiff.load_weights(pooled, named)
    unpooled = tmp_path / "unpooled.safetensors"
    save_file({k: v for k, v in tensors.items() if "spatial_weight" not in k}, unpooled)
    with pytest.raises(ValueError, match=r"down_factor=2 \(weights have None\)"):
        lindiff.load_weights(pooled, unpooled)


def test_name_and_tensors_must_agree(tmp_path):
    original = tiny.flux_transformer()
    tensors = write_clear_file(tmp_path / "pooled.safetensors", original, factor=2)
    unpooled = {k: v for k, v in tensors.items() if "spatial_weight" not in k}
    save_file(unpooled, tmp_path / "clear_local_3_down_2.safetensors")
    save_file(tensors, tmp_path / "clear_local_3.safetensors")
    save_file(tensors, tmp_path / "clear_local_3_down_4.safetensors")
    bad = dict(tensors, **{"transformer_blocks.0.attn.processor.spatial_weight": torch.ones(1, 2, 2, 1)})
    save_file(bad, tmp_path / "clear_local_3_down_2x.safetensors")
    model = lindiff.linearize(original, "clear", radius=3, down_factor=2)
    cases = {
        "clear_local_3_down_2": r"file name says down_factor=2, its tensors have no spatial_weight",
        "clear_local_3": r"file name says down_factor=None, its tensors have down_factor 2",
        "clear_local_3_down_4": r"file name says down_factor=4, its tensors have down_factor 2",
        "clear_local_3_down_2x": r"spatial_weight has shape \(1, 2, 2, 1\); CLEAR's spatial_weight is \(1, 1, 1, f, 1, f, 1\)",
    }
    for name, match in cases.items():
        with pytest.raises(ValueError, match=match):
            lindiff.load_weights(model, tmp_path / f"{name}.safetensors")


def test_hub_file_reference(tmp_path, monkeypatch):
    import huggingface_hub

    original = tiny.flux_transformer()
    local = tmp_path / "cache" / "clear_local_3_down_2.safetensors"
    write_clear_file(local, original, factor=2)
    requests = []

    def download(repo_id, filename):
        requests.append((repo_id, filename))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    model = lindiff.linearize(original, "clear", weights="Huage001/CLEAR/clear_local_3_down_2.safetensors")
    assert requests == [("Huage001/CLEAR", "clear_local_3_down_2.safetensors")]
    assert get_state(model).method.options.radius == 3

    def offline(repo_id, filename):
        raise OSError("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(
        ValueError, match=r"weights='Huage001/CLEAR/clear_local_8.safetensors' is not a local .*offline"
    ):
        lindiff.load_weights(model, "Huage001/CLEAR/clear_local_8.safetensors")
    with pytest.raises(
        ValueError, match=r"not a hub reference 'owner/name' or 'owner/name/file.safetensors'"
    ):
        lindiff.load_weights(model, "Huage001/CLEAR/clear_local_8.bin")


def test_save_clear_weights_round_trip(tmp_path):
    pipe = lindiff.linearize(tiny.flux_pipeline(), "clear", radius=3, down_factor=2)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer, attn in get_state(pipe.transformer).layers.items():
            attn.lindiff.spatial_weight.uniform_(0, 0.5, generator=generator)
            for projection in ("to_q", "to_k", "to_v", "to_out.0")[
                : 4 if layer.startswith("transformer") else 3
            ]:
                base_linear(attn, projection).weight.add_(
                    torch.randn(attn.to_q.weight.shape, generator=generator) * 0.1
                )
    path = save_clear_weights(pipe, tmp_path / "out")
    assert path == tmp_path / "out" / "clear_local_3_down_2.safetensors"

    saved = load_file(path)
    expected_keys = {
        f"{layer}.{p}.{w}" for layer in LAYERS for p in ("to_q", "to_k", "to_v") for w in ("weight", "bias")
    }
    expected_keys |= {
        f"transformer_blocks.{i}.attn.to_out.0.{w}" for i in range(2) for w in ("weight", "bias")
    }
    expected_keys |= {f"{layer}.processor.spatial_weight" for layer in LAYERS}
    assert set(saved) == expected_keys
    assert saved["single_transformer_blocks.1.attn.processor.spatial_weight"].shape == (1, 1, 1, 2, 1, 2, 1)

    fresh = lindiff.linearize(tiny.flux_transformer(), "clear", weights=path)
    trained = dict(pipe.transformer.named_parameters())
    for name, param in fresh.named_parameters():
        assert torch.equal(param, trained[name]), name
    inputs = tiny.flux_inputs(*LATENT)
    assert torch.equal(run(fresh, inputs), run(pipe.transformer, inputs))

    exact = save_clear_weights(pipe.transformer, tmp_path / "named.safetensors")
    assert exact == tmp_path / "named.safetensors" and load_file(exact).keys() == saved.keys()


def test_save_clear_weights_refuses_what_the_layout_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match=r"holds a FLUX transformer; got SD3Transformer2DModel"):
        save_clear_weights(lindiff.linearize(tiny.sd3_transformer(), "clear", radius=3), tmp_path)
    with pytest.raises(ValueError, match=r"integer window size; the model has radius=2.5"):
        save_clear_weights(lindiff.linearize(tiny.flux_transformer(), "clear", radius=2.5), tmp_path)
    with pytest.raises(ValueError, match=r"holds the 'clear' method; transformer is linearized with 'lit'"):
        save_clear_weights(lindiff.linearize(tiny.flux_transformer(), "lit"), tmp_path)
    with pytest.raises(ValueError, match=r"FluxTransformer2DModel is not linearized"):
        save_clear_weights(tiny.flux_transformer(), tmp_path)
