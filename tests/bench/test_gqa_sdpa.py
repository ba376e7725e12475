"""The compiled StaticCache baseline's GQA attention (``mustafar.bench.gqa_sdpa``): the same attention as transformers'
``"sdpa"`` (K / V repeated to every query head) on fresh random inputs, and the same greedy tokens in a model."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mustafar.bench import gqa_sdpa
from mustafar.bench.common import make_cache, use_dense_attention
from mustafar.generate import generate


class _Attn(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def _inputs(b, h_q, h_kv, q_len, t, d, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h_q, q_len, d, generator=g)
    k = torch.randn(b, h_kv, t, d, generator=g)
    v = torch.randn(b, h_kv, t, d, generator=g)
    return q, k, v


def _reference(q, k, v, mask, scale):
    """plain sdpa with K / V repeated to every query head (head h reads KV head h // G)"""
    g = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                                           attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("h_q, h_kv", [(6, 2), (7, 1), (12, 4), (4, 4)])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_packed_decode_equals_repeated_kv(h_q, h_kv, mask_kind):
    b, t, d = 3, 37, 16
    q, k, v = _inputs(b, h_q, h_kv, 1, t, d, seed=h_q * 10 + h_kv)
    mask = None
    if mask_kind != "none":
        start = torch.tensor([0, 5, 30])  # left padding of different lengths
        keep = (torch.arange(t)[None, :] >= start[:, None])[:, None, None, :]  # [B, 1, 1, T]
        mask = keep if mask_kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    out, _ = gqa_sdpa.packed_gqa_attention_forward(_Attn(h_q // h_kv), q, k, v, mask, scaling=0.3)
    ref = _reference(q, k, v, mask, 0.3)
    assert out.shape == (b, 1, h_q, d)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_prefill_goes_to_transformers_sdpa():
    """Several query tokens (prefill) run transformers' own sdpa attention: identical output."""
    q, k, v = _inputs(2, 6, 2, 5, 5, 16, seed=3)
    mod = _Attn(3)
    out, _ = gqa_sdpa.packed_gqa_attention_forward(mod, q, k, v, None, scaling=0.25)
    ref, _ = sdpa_attention_forward(mod, q, k, v, None, scaling=0.25)
    assert torch.equal(out, ref)


def test_static_baseline_runs_packed_attention_same_tokens(tiny_llama):
    """make_cache("static") switches a GQA model to the packed attention, "dense" back to "sdpa"; greedy tokens of a
    StaticCache run equal a DynamicCache run's (fp32)."""
    model, _ = tiny_llama
    assert model.config.num_attention_heads > model.config.num_key_value_heads  # the test needs a GQA model
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(1, model.config.vocab_size, (2, 9), generator=g)
    dense = generate(model, ids, make_cache("dense", model), 12)
    assert model.config._attn_implementation == "sdpa"
    static = generate(model, ids, make_cache("static", model, max_len=9 + 12), 12)
    assert model.config._attn_implementation == gqa_sdpa.ATTN_NAME
    assert torch.equal(static, dense)
    with pytest.raises(ValueError, match="'compressed' is not a dense cache kind"):
        use_dense_attention(model, "compressed")
    use_dense_attention(model, "dense")
