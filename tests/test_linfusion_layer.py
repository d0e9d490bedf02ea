"""The LinFusion attention layer against the explicit O(N^2) formula, and its invariances."""

import pytest
import torch
from diffusers.models.attention_processor import Attention

from lindiff.adapters.processors import SelfAttnProcessor
from lindiff.attention import LayerInfo, create_method
from lindiff.grid import TokenGrid
from lindiff.kernels.linear_attention import linear_attention_quadratic


def converted_attention(dim=32, heads=2, mid_dim=None, randomize=True, **options):
    attn = Attention(query_dim=dim, heads=heads, dim_head=dim // heads)
    method = create_method("linfusion", mid_dim=mid_dim, **options)
    layer = LayerInfo("attn1", attn, "self", TokenGrid())
    method.convert_layer(layer)
    attn.set_processor(SelfAttnProcessor())
    if randomize and attn.lindiff.q_mlp is not None:
        with torch.no_grad():
            for mlp in (attn.lindiff.q_mlp, attn.lindiff.k_mlp):
                mlp[3].weight.normal_(0, 0.2)
    return attn


def quadratic_reference(attn, x):
    """The same layer written with an explicit N x N kernel-attention matrix."""
    q = attn.to_q(x + attn.lindiff.q_mlp(x))
    k = attn.to_k(x + attn.lindiff.k_mlp(x))
    v = attn.to_v(x)
    b, n, _ = x.shape
    split = lambda t: t.view(b, n, attn.heads, -1)
    out = linear_attention_quadratic(
        split(q), split(k), split(v), "elu1", eps=attn.lindiff.eps, kv_scale=None
    )
    return attn.to_out[0](out.reshape(b, n, -1))


def test_layer_equals_quadratic_formula_forward_and_gradients():
    attn = converted_attention().double()
    x = torch.randn(2, 37, 32, dtype=torch.float64, requires_grad=True)
    out = attn(x)
    ref = quadratic_reference(attn, x)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)

    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *attn.parameters()], grad_out)
    grads_ref = torch.autograd.grad(ref, [x, *attn.parameters()], grad_out)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_fresh_conversion_uses_teacher_projections():
    attn = converted_attention(randomize=False)
    x = torch.randn(1, 10, 32)
    assert torch.count_nonzero(attn.lindiff.q_mlp(x)) == 0
    assert torch.count_nonzero(attn.lindiff.k_mlp(x)) == 0


@pytest.mark.parametrize("mid_dim, expected", [(None, 32), (8, 8), (0, None)])
def test_mid_dim_option(mid_dim, expected):
    attn = converted_attention(mid_dim=mid_dim)
    if expected is None:
        assert attn.lindiff.q_mlp is None and attn.lindiff.k_mlp is None
    else:
        assert attn.lindiff.q_mlp[0].out_features == expected
    assert torch.isfinite(attn(torch.randn(1, 9, 32))).all()


def test_output_does_not_drift_with_token_count():
    """Mean normalisation: a constant image gives the same output at every resolution."""
    attn = converted_attention()
    token = torch.randn(1, 1, 32)
    outputs = [attn(token.expand(1, n, 32))[0, 0] for n in (16, 256, 4096, 16384)]
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], rtol=1e-5, atol=1e-6)


def test_accepts_spatial_input_like_attention_blocks():
    attn = converted_attention()
    x = torch.randn(2, 32, 5, 7)
    out = attn(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, attn(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape_as(x))


def test_processor_is_stateless():
    attn = converted_attention()
    x = torch.randn(1, 12, 32)
    expected = attn(x)
    attn.set_processor(SelfAttnProcessor())
    torch.testing.assert_close(attn(x), expected, rtol=0, atol=0)


def test_attention_mask_is_rejected_with_a_clear_error():
    attn = converted_attention()
    with pytest.raises(ValueError, match="attention_mask"):
        attn(torch.randn(1, 4, 32), attention_mask=torch.zeros(1, 4))


@pytest.mark.parametrize(
    "options, match",
    [({"mid_dim": -3}, "mid_dim"), ({"eps": -1.0}, "eps"), ({"radius": 3}, "unknown option")],
)
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        create_method("linfusion", **options)
