"""``mustafar.generate``: eager greedy tokens == ``model.generate`` for every cache kind (with and without left
padding); the compiled decode step == eager over 128 fp32 tokens with a ``StaticCache``; a clear error for
caches that cannot be compiled.

Tiny random-weight Llama (2 layers, fp32, CPU), fresh random prompts per test. Compile costs on the 2-core
machine (measured): ``backend="aot_eager"`` ~2 s, inductor ~20 s for the first graph.
"""

import pytest
import torch

import mustafar
from mustafar import MustafarCache, MustafarConfig
from mustafar.bench.common import make_cache
from mustafar.generate import check_compileable, decode_n_tokens, generate, prefill

P, N = 40, 48  # prompt, new tokens (eager checks)
# decode-time compression happens: the window (local_window=32) exceeds 32 + 16 after 17 new tokens
MUSTAFAR_CFG = dict(k_sparsity=0.7, v_sparsity=0.7, compress_chunk=16)


@pytest.fixture(scope="module")
def model():
    """A private tiny-llama: the tests switch its attention implementation and compile against it."""
    m, _ = mustafar.load_model("tiny-llama")
    return m


def _cache(kind, model, max_len):
    if kind == "compressed":
        return MustafarCache(model, MustafarConfig(**MUSTAFAR_CFG))
    if kind == "compressed-static":  # the compileable layer (mustafar.cache.static)
        return MustafarCache(model, MustafarConfig(**MUSTAFAR_CFG), max_cache_len=max_len)
    return make_cache(kind, model, 0.0, max_len)  # dense / static also switch the model back to sdpa


def _hf_generate(model, ids, n, cache, mask):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0, eos_token_id=None, **mustafar.cache_kwargs(model, cache))


def _ids(seed, b=2, p=P):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 1000, (b, p), generator=g)


def _prompt(padded, row=0, pad=7):
    """(seed, ids [2, P], mask): a fresh random prompt (the seed is printed on failure); with ``padded``, row ``row``
    left-padded by ``pad`` tokens (id 0, mask 0)."""
    seed = torch.randint(0, 2**31 - 1, ()).item()
    ids = _ids(seed)
    mask = torch.ones_like(ids)
    if padded:
        mask[row, :pad] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return seed, ids, mask


@pytest.mark.parametrize("kind", ["dense", "static", "compressed", "compressed-static"])
@pytest.mark.parametrize("padded", [False, True])
def test_eager_matches_model_generate(model, kind, padded):
    seed, ids, mask = _prompt(padded)  # fresh inputs each run; row 0 left-padded when padded
    ours = generate(model, ids, _cache(kind, model, P + N), N, attention_mask=mask)
    ref = _hf_generate(model, ids, N, _cache(kind, model, P + N), mask)
    assert ours.shape == (2, P + N)
    assert torch.equal(ours, ref), f"seed {seed}: first differing column {(ours != ref).any(0).nonzero()[:1]}"


def test_left_padded_row_equals_the_row_alone(model):
    """Positions and mask are right: a left-padded row generates what the same prompt does unpadded."""
    seed = torch.randint(0, 2**31 - 1, ()).item()
    ids = _ids(seed)
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    ids = ids.masked_fill(mask == 0, 0)
    batched = generate(model, ids, _cache("dense", model, 0), N, attention_mask=mask)
    alone = generate(model, ids[:1, 9:], _cache("dense", model, 0), N)
    assert torch.equal(batched[0, P:], alone[0, P - 9:]), f"seed {seed}"


def test_phases_compose(model):
    """prefill + decode_n_tokens is generate (the functions a user can drive directly)."""
    ids = _ids(torch.randint(0, 2**31 - 1, ()).item())
    cache = _cache("dense", model, 0)
    with torch.no_grad():
        tok = prefill(model, ids, cache)
        rest = decode_n_tokens(model, tok, cache, torch.full((2, 1), P), 7)
    assert torch.equal(torch.cat([ids, tok, rest], 1), generate(model, ids, _cache("dense", model, 0), 8))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_static_matches_eager_128_tokens(model, backend):
    seed = torch.randint(0, 2**31 - 1, ()).item()
    ids, n = _ids(seed), 128
    eager = generate(model, ids, _cache("static", model, P + n), n)
    compiled = generate(model, ids, _cache("static", model, P + n), n, compile="default", backend=backend)
    assert torch.equal(compiled, eager), f"seed {seed}"


def test_compiled_static_left_padding_and_no_recompile(model):
    """Masked compiled decode == eager; a second call on a fresh StaticCache reuses the graph."""
    from torch._dynamo.utils import counters

    seed = torch.randint(0, 2**31 - 1, ()).item()
    ids, n = _ids(seed), 32
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    eager = generate(model, ids, _cache("static", model, P + n), n, attention_mask=mask)
    compiled = generate(model, ids, _cache("static", model, P + n), n, attention_mask=mask,
                        compile="reduce-overhead", backend="aot_eager")  # no CUDA graphs on the CPU
    assert torch.equal(compiled, eager), f"seed {seed}"
    graphs = counters["stats"]["unique_graphs"]
    cache = _cache("static", model, P + n)
    again = generate(model, ids, cache, n, attention_mask=mask, compile="reduce-overhead", backend="aot_eager")
    cache.reset()
    again2 = generate(model, ids, cache, n, attention_mask=mask, compile="reduce-overhead", backend="aot_eager")
    assert torch.equal(again, eager) and torch.equal(again2, eager)
    assert counters["stats"]["unique_graphs"] == graphs, "the compiled step was recompiled"


@pytest.mark.parametrize("kind,name", [("compressed", "MustafarCache"), ("dense", "DynamicCache")])
def test_compile_refuses_non_compileable_cache(model, kind, name):
    cache = _cache(kind, model, P + 8)
    with pytest.raises(ValueError, match=f"{name} is not compileable: .*compile=None"):
        generate(model, _ids(0), cache, 8, compile="default")
    with pytest.raises(ValueError, match=name):
        check_compileable(cache)
    assert cache.get_seq_length() == 0  # refused before anything ran
    check_compileable(_cache("static", model, 16))  # no error


def test_bad_arguments(model):
    ids = _ids(1)
    with pytest.raises(ValueError, match="compile="):
        generate(model, ids, _cache("static", model, P + 8), 8, compile="max-autotune")
    with pytest.raises(ValueError, match="holds 44 tokens"):
        generate(model, ids, _cache("static", model, 44), 8)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, _cache("dense", model, 0), 0)


@pytest.mark.parametrize("padded", [False, True])
def test_static_mustafar_matches_growing_mustafar(model, padded):
    """MustafarCache(max_cache_len=L) (preallocated, device lengths, one token encoded per step) gives the same
    greedy tokens as the growing MustafarCache (chunked compression on the host): the same schedule."""
    seed, ids, mask = _prompt(padded, row=1, pad=9)
    grow = generate(model, ids, _cache("compressed", model, 0), 96, attention_mask=mask)
    static = generate(model, ids, _cache("compressed-static", model, P + 96), 96, attention_mask=mask)
    assert torch.equal(static, grow), f"seed {seed}: first differing column {(static != grow).any(0).nonzero()[:1]}"


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_static_mustafar_matches_eager(model, backend):
    """The compiled decode step of MustafarCache(max_cache_len=L) (fullgraph, the custom ops traced through their
    fakes) gives the eager greedy tokens over 128 fp32 tokens, with left padding; a second generation on the
    reset cache reuses the compiled graph (no recompilation: lengths live on the device)."""
    from torch._dynamo.utils import counters

    seed = torch.randint(0, 2**31 - 1, ()).item()
    n = 128
    ids = _ids(seed)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    ids = ids.masked_fill(mask == 0, 0)
    eager = generate(model, ids, _cache("compressed-static", model, P + n), n, attention_mask=mask)
    cache = _cache("compressed-static", model, P + n)
    compiled = generate(model, ids, cache, n, attention_mask=mask, compile="default", backend=backend)
    assert torch.equal(compiled, eager), f"seed {seed}: first differing column {(compiled != eager).any(0).nonzero()[:1]}"
    graphs = counters["stats"]["unique_graphs"]
    cache.reset()
    again = generate(model, ids, cache, n, attention_mask=mask, compile="default", backend=backend)
    assert torch.equal(again, eager)
    assert counters["stats"]["unique_graphs"] == graphs, "the compiled step was recompiled"


@pytest.mark.parametrize("kind", ["dense", "static"])
@pytest.mark.parametrize("padded", [False, True])
def test_chunked_prefill_dense_equals_one_piece(model, kind, padded):
    """A prompt run in pieces of 7 tokens (the last one shorter) gives a dense cache the same greedy tokens."""
    seed, ids, mask = _prompt(padded, pad=11)
    one = generate(model, ids, _cache(kind, model, P + 16), 16, attention_mask=mask)
    pieces = generate(model, ids, _cache(kind, model, P + 16), 16, attention_mask=mask, prefill_chunk=7)
    assert torch.equal(pieces, one), f"seed {seed}"


def test_chunked_prefill_static_mustafar_matches_growing(model):
    """Pieces of 9 tokens into MustafarCache(max_cache_len) and into the growing MustafarCache: the same tokens
    (both compress what leaves the window after each piece; pieces 4 and 5 cross the 32-token window)."""
    seed = torch.randint(0, 2**31 - 1, ()).item()
    ids = _ids(seed)
    static_cache = _cache("compressed-static", model, P + 48)
    static = generate(model, ids, static_cache, 48, prefill_chunk=9)
    grow = generate(model, ids, _cache("compressed", model, 0), 48, prefill_chunk=9)
    assert torch.equal(static, grow), f"seed {seed}: first differing column {(static != grow).any(0).nonzero()[:1]}"
    assert static_cache.get_seq_length() == P + 47


def test_empty_prompt_raises(model):
    with pytest.raises(ValueError, match=r"P >= 1, got shape \(2, 0\)"):
        generate(model, _ids(3)[:, :0], _cache("dense", model, 0), 4, prefill_chunk=8)


def test_bad_prefill_chunk(model):
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"prefill_chunk={bad!r} must be a positive int"):
            generate(model, _ids(2), _cache("dense", model, 0), 4, prefill_chunk=bad)
