"""save_weights / load_weights, mismatch reports, and import of released LinFusion checkpoints."""

import json

import pytest
import tiny_models
import torch
from safetensors.torch import load_file, save_file

import lindiff
from lindiff.state import get_state


def perturb(model, seed=3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lindiff." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def test_round_trip_through_folder_and_file(tmp_path):
    pipe = tiny_models.sd_pipeline()
    lindiff.linearize(pipe, mid_dim=8)
    perturb(pipe.unet)
    expected = tiny_models.run(pipe)
    weights = lindiff.save_weights(pipe, tmp_path / "w")

    config = json.loads((tmp_path / "w" / "lindiff.json").read_text())
    assert config["method"] == "linfusion" and config["options"] == {"mid_dim": 8, "eps": 1e-4}
    assert config["components"]["unet"]["family"] == "unet"
    tensors = load_file(weights)
    assert tensors and all(".lindiff." in key and key.startswith("unet.") for key in tensors)

    for source in (tmp_path / "w", weights, str(weights)):
        fresh = lindiff.linearize(tiny_models.sd_pipeline(), weights=source)
        assert get_state(fresh.unet).method.options.mid_dim == 8  # options come from the weights
        assert torch.equal(tiny_models.run(fresh), expected)

    loaded = lindiff.load_weights(lindiff.linearize(tiny_models.sd_pipeline(), mid_dim=8), tmp_path / "w")
    assert torch.equal(tiny_models.run(loaded), expected)


def test_mismatches_are_listed(tmp_path):
    pipe = lindiff.linearize(tiny_models.sd_pipeline(), mid_dim=8)
    lindiff.save_weights(pipe, tmp_path)
    with pytest.raises(ValueError, match=r"q_mlp\.0\.weight has shape \(8, 16\) in the weights, \(4, 16\)"):
        lindiff.load_weights(lindiff.linearize(tiny_models.sd_pipeline(), mid_dim=4), tmp_path)
    with pytest.raises(ValueError, match=r"options conflict with weights .*mid_dim=4 \(weights have 8\)"):
        lindiff.linearize(tiny_models.sd_pipeline(), weights=tmp_path, mid_dim=4)
    with pytest.raises(ValueError, match="not linearized"):
        lindiff.load_weights(tiny_models.sd_pipeline(), tmp_path)

    tensors = load_file(tmp_path / "lindiff.safetensors")
    config = json.loads((tmp_path / "lindiff.json").read_text())
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    config["components"]["unet"]["family"] = "flux"
    save_file(tensors, tmp_path / "broken.safetensors", metadata={"lindiff_config": json.dumps(config)})
    with pytest.raises(ValueError, match="model family 'unet', weights are for 'flux'"):
        lindiff.load_weights(
            lindiff.linearize(tiny_models.sd_pipeline(), mid_dim=8), tmp_path / "broken.safetensors"
        )
    config["components"]["unet"]["family"] = "unet"
    save_file(tensors, tmp_path / "broken.safetensors", metadata={"lindiff_config": json.dumps(config)})
    with pytest.raises(ValueError, match=f"missing {dropped[len('unet.') :]}"):
        lindiff.load_weights(
            lindiff.linearize(tiny_models.sd_pipeline(), mid_dim=8), tmp_path / "broken.safetensors"
        )


def test_bad_sources(tmp_path, monkeypatch):
    unet = lindiff.linearize(tiny_models.unet())
    with pytest.raises(ValueError, match="no such file or folder"):
        lindiff.load_weights(unet, tmp_path / "missing")
    with pytest.raises(ValueError, match=r"neither lindiff\.safetensors"):
        lindiff.load_weights(unet, tmp_path)
    with pytest.raises(TypeError, match="weights must be a path"):
        lindiff.load_weights(unet, 3)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="loading it as a hub id failed"):
        lindiff.load_weights(unet, "someone/linfusion-weights")


def write_linfusion_checkpoint(folder, unet, seed=5, mid_dims=None):
    """A checkpoint in the released LinFusion layout, with modules_list in shuffled order.

    ``mid_dims``: each layer's ``projection_mid_dim`` in that order (``None``: the layer's width,
    ``-1``: no MLP); ``None`` everywhere by default.
    """
    generator = torch.Generator().manual_seed(seed)
    names = [name for name, _ in unet.named_modules() if name.endswith("attn1")][::-1]
    modules_list, tensors = [], {}
    for i, name in enumerate(names):
        attn = unet.get_submodule(name)
        dim = attn.to_q.weight.shape[0]
        mid_dim = None if mid_dims is None else mid_dims[i]
        modules_list.append(
            {"module_name": name, "dim_n": dim, "heads": attn.heads, "projection_mid_dim": mid_dim}
        )
        shapes = {
            "to_q.weight": (dim, dim),
            "to_k.weight": (dim, dim),
            "to_v.weight": (dim, dim),
            "to_out.0.weight": (dim, dim),
            "to_out.0.bias": (dim,),
        }
        mid = dim if mid_dim is None else mid_dim
        for mlp in ("to_q_", "to_k_") if mid_dim != -1 else ():
            shapes.update({f"{mlp}.0.weight": (mid, dim), f"{mlp}.0.bias": (mid,), f"{mlp}.1.weight": (mid,)})
            shapes.update({f"{mlp}.1.bias": (mid,), f"{mlp}.3.weight": (dim, mid), f"{mlp}.3.bias": (dim,)})
        for key, shape in shapes.items():
            tensors[f"{i}.{key}"] = torch.randn(shape, generator=generator) * 0.1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps({"_class_name": "LinFusion", "modules_list": modules_list})
    )
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    return modules_list, tensors


def test_linfusion_checkpoint_import_and_exact_restore(tmp_path):
    pipe = tiny_models.sd_controlnet_pipeline()
    image = torch.rand(1, 3, 32, 32)
    original = tiny_models.run(pipe, image=image)
    modules_list, tensors = write_linfusion_checkpoint(tmp_path / "linfusion", pipe.unet)

    lindiff.linearize(pipe, weights=tmp_path / "linfusion")

    for i, entry in enumerate(modules_list):
        attn = pipe.unet.get_submodule(entry["module_name"])
        assert torch.equal(attn.to_q.weight, tensors[f"{i}.to_q.weight"])
        assert torch.equal(attn.to_out[0].bias, tensors[f"{i}.to_out.0.bias"])
        assert torch.equal(attn.lindiff.q_mlp[0].weight, tensors[f"{i}.to_q_.0.weight"])
        assert torch.equal(attn.lindiff.k_mlp[3].bias, tensors[f"{i}.to_k_.3.bias"])
        if entry["module_name"].startswith(("down_blocks", "mid_block")):
            # The ControlNet copies the UNet encoder: it borrows the UNet's layers by name.
            borrowed = pipe.controlnet.get_submodule(entry["module_name"])
            assert torch.equal(borrowed.lindiff.q_mlp[0].weight, tensors[f"{i}.to_q_.0.weight"])
    assert torch.isfinite(tiny_models.run(pipe, image=image)).all()

    saved = load_file(lindiff.save_weights(pipe, tmp_path / "ours"))
    assert any(key.endswith("attn1.to_q.weight") for key in saved)  # loaded projections are saved too

    lindiff.restore(pipe)
    assert torch.equal(tiny_models.run(pipe, image=image), original)


def test_linfusion_checkpoint_with_a_width_per_layer(tmp_path):
    """Released configs whose layers differ in projection_mid_dim (-1: no MLP, None: the layer's width)."""
    mid_dims = [8, -1, None, 4, 8, 6, 12]
    modules_list, tensors = write_linfusion_checkpoint(
        tmp_path / "linfusion", tiny_models.unet(), mid_dims=mid_dims
    )
    widths = {
        entry["module_name"]: 0 if mid == -1 else mid
        for entry, mid in zip(modules_list, mid_dims, strict=True)
    }

    pipe = lindiff.linearize(tiny_models.sd_pipeline(), weights=tmp_path / "linfusion")
    assert get_state(pipe.unet).method.options.mid_dim == widths

    # The same layers built from the widths by hand, the weights copied in by hand.
    expected = lindiff.linearize(tiny_models.sd_pipeline(), mid_dim=widths)
    with torch.no_grad():
        for i, entry in enumerate(modules_list):
            attn = expected.unet.get_submodule(entry["module_name"])
            assert (attn.lindiff.q_mlp is None) == (mid_dims[i] == -1)
            for key, tensor in tensors.items():
                index, rest = key.split(".", 1)
                if int(index) == i:
                    for old, new in (("to_q_.", "lindiff.q_mlp."), ("to_k_.", "lindiff.k_mlp.")):
                        rest = rest.replace(old, new) if rest.startswith(old) else rest
                    attn.get_parameter(rest).copy_(tensor)
    output = tiny_models.run(pipe)
    assert torch.isfinite(output).all()
    assert torch.equal(output, tiny_models.run(expected))

    # Per-layer widths save in lindiff's own format and come back.
    lindiff.save_weights(pipe, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "lindiff.json").read_text())["options"]["mid_dim"] == widths
    fresh = lindiff.linearize(tiny_models.sd_pipeline(), weights=tmp_path / "ours")
    assert torch.equal(tiny_models.run(fresh), output)


def test_per_layer_widths_must_name_every_layer():
    with pytest.raises(
        ValueError, match=r"mid_dim gives no width for layer 'down_blocks\.0\..*attn1'; it names 1 layers"
    ):
        lindiff.linearize(
            tiny_models.unet(), mid_dim={"mid_block.attentions.0.transformer_blocks.0.attn1": 4}
        )
    with pytest.raises(
        ValueError, match=r"mid_dim must be None, an integer >= 0, or a dict .*got \{'x': -2\}"
    ):
        lindiff.linearize(tiny_models.unet(), mid_dim={"x": -2})
