from __future__ import annotations

import pytest
import torch

from recipes.tiny_shapes.denoiser import train_text_to_image
from recipes.tiny_shapes.muon import MuonAdamW, orthogonalize, uses_muon


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.token_embedding = torch.nn.Embedding(10, 6)
        self.conv = torch.nn.Conv2d(6, 5, 3, padding=1)
        self.linear = torch.nn.Linear(5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids).permute(0, 3, 1, 2)
        return self.linear(self.conv(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("shape", [(8, 20), (20, 8), (16, 16)])
def test_orthogonalize_keeps_the_singular_vectors_and_pushes_the_values_towards_one(
    shape: tuple[int, int],
) -> None:
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    matrix[:, 0] *= 20  # one direction dominates
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    out = orthogonalize(matrix)
    assert out.shape == shape
    mapped = u.T @ out @ vh.T  # diagonal: same singular vectors
    assert torch.allclose(mapped, torch.diag(torch.diagonal(mapped)), atol=1e-6)
    above = s / matrix.norm() > 1 / 300
    assert above.sum() >= min(shape) - 1
    assert torch.all((torch.diagonal(mapped)[above] > 0.6) & (torch.diagonal(mapped)[above] < 1.25))
    with pytest.raises(ValueError, match="matrix must be 2-D"):
        orthogonalize(torch.randn(2, 3, 4))


def test_muon_takes_matrices_and_kernels_adamw_the_rest() -> None:
    model = _Tiny()
    chosen = {n for n, p in model.named_parameters() if uses_muon(n, p)}
    assert chosen == {"conv.weight", "linear.weight"}
    optimizer = MuonAdamW.for_module(model)
    assert [g["muon"] for g in optimizer.param_groups] == [True, False]
    with pytest.raises(ValueError, match="matrices must be 2-D or 4-D weights"):
        MuonAdamW([model.conv.bias], [])
    with pytest.raises(ValueError, match="need lr > 0"):
        MuonAdamW([model.conv.weight], [], lr=0.0)


def test_one_step_moves_kernels_orthogonally_and_the_rest_like_adamw() -> None:
    torch.manual_seed(0)
    model, reference = _Tiny(), _Tiny()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 10, (4, 3, 3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for net in (model, reference):
        net(ids).square().mean().backward()
    MuonAdamW.for_module(model, lr=1e-2, weight_decay=0.0).step()
    torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0).step()
    moved = before["conv.weight"] - model.conv.weight.detach()
    singular = torch.linalg.svdvals(moved.reshape(5, -1)) / (1e-2 * 0.2 * 54**0.5)
    # the gradient has rank 3 (it passes the 3 outputs of `linear`); each of its directions moves alike
    assert torch.all((singular[:3] > 0.6) & (singular[:3] < 1.25)) and singular[3:].max() < 1e-3
    for name in ("conv.bias", "linear.bias", "token_embedding.weight"):
        assert torch.allclose(dict(model.named_parameters())[name], dict(reference.named_parameters())[name])


def test_training_converges_and_resumes_from_a_state_dict() -> None:
    torch.manual_seed(1)
    ids = torch.randint(0, 10, (32, 3, 3))
    target = torch.randn(32, 3)

    def run(model: torch.nn.Module, optimizer: MuonAdamW, steps: int) -> float:
        for _ in range(steps):
            loss = (model(ids) - target).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()

    model = _Tiny()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = MuonAdamW.for_module(model, lr=1e-2)
    first = (model(ids) - target).square().mean().item()
    assert run(model, optimizer, 150) < 0.5 * first
    resumed = _Tiny()
    resumed.load_state_dict(start)
    resumed_optimizer = MuonAdamW.for_module(resumed, lr=1e-2)
    run(resumed, resumed_optimizer, 100)
    state = resumed_optimizer.state_dict()
    resumed_optimizer = MuonAdamW.for_module(resumed, lr=1e-2)
    resumed_optimizer.load_state_dict(state)
    run(resumed, resumed_optimizer, 50)
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key])
    with pytest.raises(ValueError, match="does not take a closure"):
        optimizer.step(lambda: 0.0)


def test_text_to_image_names_its_optimizers(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"optimizer must be one of \('adamw', 'muon'\); got 'sgd'"):
        train_text_to_image(
            torch.zeros(1, 4, 16, 16),
            torch.zeros(1, 24, dtype=torch.long),
            None,
            tmp_path,
            steps=1,
            optimizer="sgd",
            device=torch.device("cpu"),
        )
