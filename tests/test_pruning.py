"""Tests of mustafar.pruning: counts, masks, tie rule, structure of every strategy, bad inputs."""

import math

import pytest
import torch

from mustafar.pruning import STRATEGIES, kept_count, prune, topk_mask
from mustafar.pruning.output_aware import key_scores

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # the GPU machine may not have hypothesis
    given = None

GEN = torch.Generator().manual_seed(0)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=GEN).to(dtype)


def check_mask(x, y, mask):
    """pruned == 0 exactly where the mask is False, unchanged (bitwise) where True."""
    assert y.shape == x.shape and y.dtype == x.dtype and mask.dtype == torch.bool and mask.shape == x.shape
    assert torch.all(y[~mask] == 0)
    assert torch.equal(y[mask], x[mask])


def q_for(x, G=2, T=None):
    B, H, T0, D = x.shape
    return randn(B, H * G, T0 if T is None else T, D)


# ---------------------------------------------------------------- counts and the per-token rule
@pytest.mark.parametrize(
    "D,s,k", [(128, 0.7, 38), (128, 0.5, 64), (64, 0.7, 19), (128, 0.0, 128), (64, 0.5078125, 31), (64, 0.99, 1)]
)
def test_kept_count(D, s, k):
    assert kept_count(D, s) == k == D - math.floor(s * D + 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D,s", [(64, 0.5), (128, 0.7), (128, 0.3), (64, 0.0)])
def test_per_token_exact_counts(dtype, D, s):
    x = randn(2, 3, 17, D, dtype=dtype)
    y, m = prune(x, s, return_mask=True)
    check_mask(x, y, m)
    k = kept_count(D, s)
    assert torch.all(m.sum(-1) == k)
    assert torch.all((y != 0).sum(-1) == k)  # random normal data has no zeros
    # kept entries are the largest: min kept |x| >= max pruned |x| per token vector
    a = x.abs().float()
    if 0 < k < D:
        assert torch.all(a.masked_fill(~m, math.inf).amin(-1) >= a.masked_fill(m, -1).amax(-1))
    assert torch.equal(prune(x, s), y)
    assert torch.equal(topk_mask(x, k), m)


def test_tie_rule_lower_channel_pruned_first():
    x = torch.ones(1, 1, 1, 8)
    _, m = prune(x, 0.5, return_mask=True)
    assert m[0, 0, 0].tolist() == [False] * 4 + [True] * 4
    x = torch.tensor([3.0, -1.0, 1.0, 2.0, -0.0, 0.0, 1.0, 5.0]).reshape(1, 1, 1, 8)
    _, m = prune(x, 0.5, return_mask=True)  # prune 4: the two zeros (4, 5), then |1| at channels 1, 2
    assert m[0, 0, 0].tolist() == [True, False, False, True, False, False, True, True]


def test_nan_is_largest_and_inf_kept():
    x = randn(1, 1, 2, 64)
    x[0, 0, 0, 3] = float("nan")
    x[0, 0, 1, 5] = float("-inf")
    y, m = prune(x, 0.95, return_mask=True)  # keeps 3 per vector
    assert m[0, 0, 0, 3] and m[0, 0, 1, 5]
    assert torch.isnan(y[0, 0, 0, 3]) and y[0, 0, 1, 5] == -math.inf
    assert torch.all(m.sum(-1) == 3)


if given is not None:

    @settings(max_examples=25, deadline=None)
    @given(
        B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 9),
        D=st.sampled_from([4, 64, 128]), s=st.floats(0.0, 0.99), seed=st.integers(0, 2**16),
    )
    def test_per_token_property(B, H, T, D, s, seed):
        x = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(seed)).round(decimals=1)  # ties
        y, m = prune(x, s, return_mask=True)
        check_mask(x, y, m)
        k = kept_count(D, s)
        assert torch.all(m.sum(-1) == k)
        # reference: stable ascending sort, prune the first D-k
        order = torch.sort(x.abs(), dim=-1, stable=True).indices
        ref = torch.ones_like(m).scatter_(-1, order[..., : D - k], False)
        assert torch.equal(m, ref)


# ---------------------------------------------------------------- per-channel
@pytest.mark.parametrize("T,g", [(70, 32), (64, 32), (5, 32), (40, 16)])
@pytest.mark.parametrize("s", [0.5, 0.7])
def test_per_channel_counts_per_group(T, g, s):
    x = randn(2, 2, T, 64)
    y, m = prune(x, s, "per_channel_magnitude", group_size=g, return_mask=True)
    check_mask(x, y, m)
    for start in range(0, T, g):
        n = min(g, T - start)
        cnt = m[:, :, start : start + n].sum(2)  # [B, H, D]
        assert torch.all(cnt == n - math.floor(s * n + 0.5)), (start, n)
        blk = x[:, :, start : start + n].abs()
        mb = m[:, :, start : start + n]
        if 0 < cnt.min() < n:
            assert torch.all(blk.masked_fill(~mb, math.inf).amin(2) >= blk.masked_fill(mb, -1).amax(2))


# ---------------------------------------------------------------- 2:4
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_semi_structured_2_4_pattern(dtype):
    x = randn(2, 2, 9, 64, dtype=dtype)
    y, m = prune(x, 0.5, "semi_structured_2_4", return_mask=True)
    check_mask(x, y, m)
    g = m.reshape(2, 2, 9, 16, 4)
    assert torch.all(g.sum(-1) == 2)
    a = x.abs().float().reshape(2, 2, 9, 16, 4)
    assert torch.all(a.masked_fill(~g, math.inf).amin(-1) >= a.masked_fill(g, -1).amax(-1))
    t = torch.tensor([1.0, 1.0, 1.0, 1.0]).reshape(1, 1, 1, 4)  # ties: lower channels pruned
    assert prune(t, 0.5, "semi_structured_2_4", return_mask=True)[1].flatten().tolist() == [False, False, True, True]


# ---------------------------------------------------------------- ThinK
@pytest.mark.parametrize("s", [0.3, 0.5, 0.7])
def test_think_prunes_whole_channels(s):
    k = randn(2, 2, 40, 64)
    q = randn(2, 4, 40, 64)
    q[:, :, :, :8] *= 50.0  # channels 0..7 dominate the query-driven score
    y, m = prune(k, s, "think", q=q, return_mask=True)
    check_mask(k, y, m)
    assert torch.all(m == m[:, :, :1, :])  # same channels for every token of a head
    n = math.floor(s * 64 + 0.5)
    assert torch.all((~m[:, :, 0]).sum(-1) == n)
    assert torch.all(m[:, :, :, :8])
    # channel score = ||Q_obs[:, c]|| * ||K[:, c]||: prune exactly the lowest-scoring channels
    qn = q[:, :, -32:].pow(2).reshape(2, 2, -1, 64).sum(2).sqrt()
    score = qn * k.pow(2).sum(2).sqrt()  # [B, H_kv, D]
    ref = torch.ones(2, 2, 64, dtype=torch.bool).scatter_(-1, score.argsort(-1)[..., :n], False)
    assert torch.equal(m[:, :, 0], ref)


# ---------------------------------------------------------------- output-aware
def brute_key_scores(k, q, window):
    B, H, T, D = k.shape
    G = q.shape[1] // H
    out = torch.empty(B, H, T, D, dtype=torch.float64)
    for h in range(H):
        qa = q[:, h * G : (h + 1) * G].abs().double().sum(1)  # [B, T, D]
        for t in range(T):
            out[:, h, t] = k[:, h, t].abs().double() * qa[:, t : t + window].sum(1)
    return out


def test_output_aware_key_scores_match_brute_force():
    k, q = randn(2, 2, 21, 64), randn(2, 4, 21, 64)
    torch.testing.assert_close(key_scores(k, q, window=8).double(), brute_key_scores(k, q, 8), rtol=1e-5, atol=1e-6)
    y, m = prune(k, 0.7, "output_aware", q=q, window=8, return_mask=True)
    check_mask(k, y, m)
    assert torch.equal(m, topk_mask(brute_key_scores(k, q, 8), kept_count(64, 0.7)))


def test_output_aware_differs_from_magnitude_when_q_is_skewed():
    k = randn(1, 2, 64, 64)
    q = randn(1, 4, 64, 64) * 0.01
    q[..., :8] = 100.0  # the queries only read channels 0..7
    m_oa = prune(k, 0.7, "output_aware", q=q, return_mask=True)[1]
    m_mag = prune(k, 0.7, return_mask=True)[1]
    assert torch.all(m_oa[..., :8])  # every token keeps the channels queries read
    assert not torch.equal(m_oa, m_mag)
    assert (m_oa != m_mag).float().mean() > 0.1
    assert torch.all(m_oa.sum(-1) == kept_count(64, 0.7))


def test_output_aware_value_attn_given_equals_computed():
    k, v, q = randn(1, 2, 24, 64), randn(1, 2, 24, 64), randn(1, 4, 24, 64)
    s = (q.reshape(1, 2, 2 * 24, 64) @ k.transpose(-1, -2)) * 64**-0.5  # [B, H_kv, G*T, T]
    causal = torch.ones(24, 24, dtype=torch.bool).tril().repeat(2, 1)
    attn = torch.softmax(s.masked_fill(~causal, -math.inf), -1).reshape(1, 4, 24, 24)
    for gran in ("per_token", "per_channel"):
        y1, m1 = prune(v, 0.5, "output_aware", kind="value", granularity=gran, attn=attn, return_mask=True)
        y2, m2 = prune(v, 0.5, "output_aware", kind="value", granularity=gran, q=q, k=k, return_mask=True)
        check_mask(v, y1, m1)
        assert torch.equal(m1, m2)
    # per-channel: counts per token group as per_channel_magnitude; scores weight tokens, so
    # heavily attended tokens survive more often than under plain per-channel magnitude
    mc = prune(v, 0.5, "output_aware", kind="value", granularity="per_channel", attn=attn, group_size=8, return_mask=True)[1]
    assert torch.all(mc.reshape(1, 2, 3, 8, 64).sum(3) == 4)


# ---------------------------------------------------------------- common contract and bad input
@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_strategy_contract(name, dtype):
    x = randn(1, 2, 32, 64, dtype=dtype)  # one full token group for per_channel_magnitude
    kw = {"q": randn(1, 4, 32, 64, dtype=dtype)} if name in ("output_aware", "think") else {}
    y, m = prune(x, 0.5, name, return_mask=True, **kw)
    check_mask(x, y, m)
    assert m.sum().item() == x.numel() // 2


X = torch.randn(1, 2, 8, 64)
BAD = [
    (lambda: prune(X, 1.0), "1.0"),
    (lambda: prune(X, -0.1), "-0.1"),
    (lambda: prune(X, float("nan")), "nan"),
    (lambda: prune(X, True), "True"),
    (lambda: prune(X, "0.5"), "'0.5'"),
    (lambda: prune(X[0], 0.5), "rank 3"),
    (lambda: prune(torch.ones(1, 2, 8, 64, dtype=torch.int32), 0.5), "int32"),
    (lambda: prune(torch.ones(1, 2, 8, 64, dtype=torch.bool), 0.5, "per_channel_magnitude"), "bool"),
    (lambda: prune(X, 0.5, "magnitude_xyz"), "magnitude_xyz"),
    (lambda: prune(X, 0.5, "output_aware"), "q=None"),
    (lambda: prune(X, 0.5, "think"), "q=None"),
    (lambda: prune(X, 0.5, "output_aware", kind="value"), "k=None"),
    (lambda: prune(X, 0.5, "output_aware", q=torch.randn(1, 3, 8, 64)), "H_q=3"),
    (lambda: prune(X, 0.5, "output_aware", q=torch.randn(1, 4, 8, 32)), "(1, 4, 8, 32)"),
    (lambda: prune(X, 0.5, "output_aware", q=torch.randn(1, 4, 8, 64), kind="query"), "'query'"),
    (lambda: prune(X, 0.5, "output_aware", q=torch.randn(1, 4, 8, 64), granularity="row"), "'row'"),
    (lambda: prune(X, 0.5, "output_aware", q=torch.randn(1, 4, 8, 64), window=0), "window"),
    (lambda: prune(X, 0.5, "think", q=torch.randn(1, 4, 8, 64), kind="value"), "'value'"),
    (lambda: prune(X, 0.5, "per_channel_magnitude", group_size=0), "group_size"),
    (lambda: prune(X, 0.3, "semi_structured_2_4"), "0.3"),
    (lambda: prune(torch.randn(1, 2, 8, 6), 0.5, "semi_structured_2_4"), "D=6"),
    (lambda: topk_mask(X, 65), "65"),
    (lambda: prune(X, 0.5, q=torch.randn(1, 4, 8, 64)), "['q']"),
    (lambda: kept_count(64, 1.5), "1.5"),
]


@pytest.mark.parametrize("fn,needle", BAD, ids=[b[1] for b in BAD])
def test_bad_input_raises_value_error(fn, needle):
    with pytest.raises(ValueError) as e:
        fn()
    assert needle in str(e.value)
