"""Projections changed after `linearize`, however: saved bit-exactly, and `restore` gives the
teacher back (with a backup) or refuses before touching anything (without one)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import tiny_models
import torch
from peft import LoraConfig
from safetensors.torch import load_file

import lindiff
from lindiff.adapters.processors import SelfAttnProcessor
from lindiff.distill.student import select_trainable
from lindiff.state import fingerprint, get_state, projections_of


def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 7, tiny_models.TEXT_DIM, generator=generator)
    return sample, torch.tensor([10, 10]), text


def forward(unet: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return unet(*unet_inputs()).sample


def change_in_place(unet: torch.nn.Module) -> None:
    """A direct edit of one projection of one converted layer."""
    attn = next(iter(get_state(unet).layers.values()))
    with torch.no_grad():
        attn.to_q.weight.add_(torch.randn(attn.to_q.weight.shape, generator=torch.Generator().manual_seed(2)))


def change_by_optimizer(unet: torch.nn.Module) -> None:
    """One AdamW step of a user's own loop on the converted layers' projections."""
    params = [param for _, param in get_state(unet).projection_parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    unet(*unet_inputs()).sample.square().mean().backward()
    optimizer.step()
    unet.zero_grad(set_to_none=True)


def change_by_merged_lora(unet: torch.nn.Module) -> None:
    """A PEFT LoRA (random ``lora_B``) on the converted layers' projections, fused and unloaded."""
    state = get_state(unet)
    targets = [f"{name}.{p}" for name, attn in state.layers.items() for p in projections_of(attn)]
    torch.manual_seed(4)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=targets))
    unet.fuse_lora()
    unet.unload_lora()


CHANGES = [change_in_place, change_by_optimizer, change_by_merged_lora]


@pytest.fixture(scope="module")
def teacher_output() -> torch.Tensor:
    return forward(tiny_models.unet())


def assert_still_linearized(unet: torch.nn.Module, expected: torch.Tensor) -> None:
    state = get_state(unet)
    assert state is not None
    assert all(isinstance(attn.processor, SelfAttnProcessor) for attn in state.layers.values())
    assert all(hasattr(attn, "lindiff") for attn in state.layers.values())
    assert torch.equal(forward(unet), expected)


@pytest.mark.parametrize("change", CHANGES)
def test_changed_projections_survive_save_and_load(change: Callable[[torch.nn.Module], None], tmp_path):
    pipe = lindiff.linearize(tiny_models.sd_pipeline())
    change(pipe.unet)
    changed = get_state(pipe.unet).changed_projections()
    assert changed
    expected = tiny_models.run(pipe)

    saved = load_file(lindiff.save_weights(pipe, tmp_path))
    assert sorted(key for key in saved if ".lindiff." not in key) == sorted(f"unet.{key}" for key in changed)
    fresh = lindiff.linearize(tiny_models.sd_pipeline(), weights=tmp_path)
    assert torch.equal(tiny_models.run(fresh), expected)
    loaded = lindiff.load_weights(lindiff.linearize(tiny_models.sd_pipeline()), tmp_path)
    assert torch.equal(tiny_models.run(loaded), expected)


@pytest.mark.parametrize("change", CHANGES)
def test_restore_refuses_without_a_backup_and_changes_nothing(change, teacher_output):
    unet = lindiff.linearize(tiny_models.unet())
    change(unet)
    expected = forward(unet)
    layers = len(get_state(unet).layers) if change is not change_in_place else 1
    with pytest.raises(
        ValueError,
        match=rf"cannot restore unet \(UNet2DConditionModel\): the teacher's q/k/v/out projections of "
        rf"{layers} converted layer\(s\) \(down_blocks\.0\..*to_q\.weight.*\) were changed outside lindiff "
        r"after linearize .* keep_teacher=True",
    ):
        lindiff.restore(unet)
    assert_still_linearized(unet, expected)
    assert not torch.equal(expected, teacher_output)


@pytest.mark.parametrize("change", CHANGES)
def test_restore_gives_the_teacher_back_with_keep_teacher(change, teacher_output):
    unet = lindiff.linearize(tiny_models.unet(), keep_teacher=True)
    change(unet)
    lindiff.restore(unet)
    assert get_state(unet) is None
    assert torch.equal(forward(unet), teacher_output)


def test_keep_teacher_must_be_a_bool():
    with pytest.raises(TypeError, match="keep_teacher must be True or False, got 'yes'"):
        lindiff.linearize(tiny_models.unet(), keep_teacher="yes")


def test_restore_gives_the_teacher_back_after_distillation_selects_projections(teacher_output):
    unet = lindiff.linearize(tiny_models.unet())
    select_trainable(unet, "attention")  # keeps a backup, as lindiff.distill does
    change_by_optimizer(unet)
    assert get_state(unet).changed_projections()
    lindiff.restore(unet)
    assert torch.equal(forward(unet), teacher_output)


def test_loaded_projections_keep_the_teachers_as_reference(tmp_path, teacher_output):
    """Loading projections (once or twice) keeps the teacher's backup; a change made before the
    load, without a backup, is not mistaken for the teacher's."""
    trained = lindiff.linearize(tiny_models.unet())
    change_by_optimizer(trained)
    lindiff.save_weights(trained, tmp_path)

    twice = lindiff.linearize(tiny_models.unet(), weights=tmp_path)
    lindiff.load_weights(twice, tmp_path)
    assert get_state(twice).changed_projections() == get_state(trained).changed_projections()
    lindiff.restore(twice)
    assert torch.equal(forward(twice), teacher_output)

    edited = lindiff.linearize(tiny_models.unet())
    change_in_place(edited)  # changes a parameter the checkpoint also holds
    lindiff.load_weights(edited, tmp_path)
    with pytest.raises(
        ValueError, match=r"projections of 1 converted layer\(s\) \(down_blocks\.0\.\S*to_q\.weight\)"
    ):
        lindiff.restore(edited)


def test_unchanged_projections_are_not_saved_even_after_a_cast(tmp_path):
    pipe = lindiff.linearize(tiny_models.sd_pipeline())
    weights = lindiff.save_weights(pipe, tmp_path / "fp32")
    saved = load_file(weights)
    assert saved and all(".lindiff." in key for key in saved)
    added = sum(p.numel() * p.element_size() for n, p in pipe.unet.named_parameters() if ".lindiff." in n)
    assert weights.stat().st_size < added + 16_384  # the added tensors and a header, no projections

    for dtype in (torch.float16, torch.bfloat16):
        unet = lindiff.linearize(tiny_models.unet()).to(dtype)
        assert get_state(unet).changed_projections() == []
        assert all(".lindiff." in key for key in load_file(lindiff.save_weights(unet, tmp_path / str(dtype))))
        lindiff.restore(unet)  # the teacher in the new dtype: nothing to give back
        teacher = tiny_models.unet().to(dtype).state_dict()
        assert all(torch.equal(value, teacher[key]) for key, value in unet.state_dict().items())

    unet = lindiff.linearize(tiny_models.unet()).to(torch.float64)  # a dtype without a fingerprint
    assert len(get_state(unet).changed_projections()) == len(list(get_state(unet).projection_parameters()))
    with pytest.raises(ValueError, match="or cast to a dtype other than float32, float16, bfloat16"):
        lindiff.restore(unet)


def test_the_fingerprint_keeps_no_copy():
    unet = lindiff.linearize(tiny_models.unet())
    state = get_state(unet)
    assert state.projection_backup is None
    keys = [key for key, _ in state.projection_parameters()]
    assert list(state.fingerprints) == keys
    for hashes in state.fingerprints.values():
        assert set(hashes) == {torch.float32, torch.float16, torch.bfloat16}
        assert all(type(value) is int for value in hashes.values())


def test_fingerprint_sees_every_single_change_and_ignores_layout():
    generator = torch.Generator().manual_seed(0)
    tensor = torch.randn(3 * 2**16 + 5, generator=generator)  # three full blocks and a tail
    reference = int(fingerprint(tensor))
    assert int(fingerprint(tensor.clone())) == reference
    for index in (0, 2**16 - 1, 2**16, 3 * 2**16, 3 * 2**16 + 4):
        flipped = tensor.clone()
        flipped.view(torch.int32)[index] ^= 1  # the lowest mantissa bit
        assert int(fingerprint(flipped)) != reference, index
    swapped = tensor.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert int(fingerprint(swapped)) != reference
    assert int(fingerprint(torch.tensor([0.0]))) != int(fingerprint(torch.tensor([-0.0])))
    matrix = torch.randn(40, 24, generator=generator)
    assert int(fingerprint(matrix.t())) == int(fingerprint(matrix.t().contiguous()))
    assert int(fingerprint(matrix.half())) == int(fingerprint(matrix.half().clone()))


@pytest.mark.gpu
def test_fingerprint_is_the_same_on_cuda_and_costs_no_copy():
    tensor = torch.randn(5 * 2**16 + 3)
    assert int(fingerprint(tensor.cuda())) == int(fingerprint(tensor))
    unet = tiny_models.unet().cuda()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    lindiff.linearize(unet)
    added = sum(p.numel() * p.element_size() for n, p in unet.named_parameters() if ".lindiff." in n)
    assert torch.cuda.memory_allocated() - before <= added + 2**20  # + the cached block weights
    state = get_state(unet)
    assert state.changed_projections() == []
    change_in_place(unet)
    assert len(state.changed_projections()) == 1
