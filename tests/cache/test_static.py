"""The compileable layer (``MustafarCache(..., max_cache_len=L)``, :mod:`mustafar.cache.static`).

Against the growing cache (the host-side chunked schedule) on fresh random prompts: the same greedy tokens
(fp32 tiny presets, fp16 / fp8 stored values, multi-turn prefills, a hybrid sliding-window model); the exact
byte count; in-place reset (static addresses kept); a clear error when full.
"""

import pytest
import torch

import mustafar
from mustafar import MustafarCache, MustafarConfig
from mustafar.cache import preallocated_layer_nbytes
from mustafar.cache.static import MustafarStaticLayer, static_capable
from mustafar.generate import generate

SMALL = dict(local_window=8, compress_chunk=16)
_MODELS: dict = {}


def _model(name):
    if name not in _MODELS:
        _MODELS[name] = mustafar.load_model(name)[0].eval()
    return _MODELS[name]


def _ids(b=2, t=40):
    return torch.randint(3, 1000, (b, t))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("vdt", [("model", "model"), ("fp8_e4m3", "fp8_e4m3"), ("model", "fp8_e4m3")])
def test_static_equals_growing(name, vdt):
    model = _model(name)
    cfg = MustafarConfig(k_sparsity=0.7, v_sparsity=0.6, k_value_dtype=vdt[0], v_value_dtype=vdt[1], **SMALL)
    ids = _ids()
    grow = generate(model, ids, MustafarCache(model, cfg), 48)
    cache = MustafarCache(model, cfg, max_cache_len=ids.shape[1] + 48)
    assert cache.is_compileable
    assert any(isinstance(layer, MustafarStaticLayer) for layer in cache.layers)
    static = generate(model, ids, cache, 48)
    assert torch.equal(static, grow)


def test_multi_turn_prefill_equals_growing():
    """A second multi-token call attends densely to the compressed past (decoded) and the window, as the growing
    cache does, then compresses all but the window."""
    model = _model("tiny-llama")
    cfg = MustafarConfig(k_sparsity=0.7, v_sparsity=0.7, **SMALL)
    a, b = _ids(t=30), _ids(t=21)
    outs = []
    for cache in (MustafarCache(model, cfg), MustafarCache(model, cfg, max_cache_len=200)):
        first = generate(model, a, cache, 20)
        second = generate(model, b, cache, 20)
        outs.append((first, second, int(cache.get_seq_length())))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert outs[0][2] == outs[1][2] == 30 + 19 + 21 + 19  # the last new token of a call is not fed back


@pytest.mark.parametrize("vdt", ["model", "fp8_e4m3"])
def test_bytes_exact_and_below_static_cache(vdt):
    model = _model("tiny-llama")
    cfg = MustafarConfig(k_sparsity=0.7, v_sparsity=0.7, k_value_dtype=vdt, v_value_dtype=vdt, **SMALL)
    L = 1000
    cache = MustafarCache(model, cfg, max_cache_len=L)
    generate(model, _ids(), cache, 10)
    layer = next(x for x in cache.layers if isinstance(x, MustafarStaticLayer))
    per_layer = preallocated_layer_nbytes(cfg, 2, layer.num_kv_heads, layer.head_dim, layer.dtype, L)
    assert cache.nbytes() == per_layer * len(cache.layers)
    assert cache.breakdown()["total"] == cache.nbytes()
    static_bytes = 2 * 2 * layer.num_kv_heads * L * layer.head_dim * layer.dtype.itemsize
    assert per_layer < static_bytes  # a smaller cache never holds more than the dense one it replaces


def test_reset_in_place_and_repeatable():
    model = _model("tiny-llama")
    cfg = MustafarConfig(k_sparsity=0.7, v_sparsity=0.7, **SMALL)
    cache = MustafarCache(model, cfg, max_cache_len=120)
    ids = _ids()
    first = generate(model, ids, cache, 30)
    layer = cache.layers[0]
    ptrs = [t.data_ptr() for t in layer.tensors().values()]
    cache.reset()
    assert int(cache.get_seq_length()) == 0 and layer.lengths.tolist() == [0, 0]
    again = generate(model, ids, cache, 30)
    assert torch.equal(first, again)
    assert [t.data_ptr() for t in layer.tensors().values()] == ptrs


def test_static_addresses_marked():
    """A CUDA graph (``mode="reduce-overhead"``) replays a step that mutates an input only if that input is a
    static address; transformers' ``StaticLayer`` marks its buffers with ``torch._dynamo.mark_static_address``
    and so must every buffer of ours (unmarked, inductor skipped the graphs: "mutated inputs")."""
    from transformers import StaticCache

    from mustafar.generate import prefill

    model = _model("tiny-llama")
    ids = _ids()
    dense = StaticCache(config=model.config, max_cache_len=80)
    with torch.no_grad():
        prefill(model, ids, dense)
    assert getattr(dense.layers[0].keys, "_dynamo_static_input_type", None) is not None  # the mechanism
    for vdt in ("model", "fp8_e4m3"):
        cache = MustafarCache(model, MustafarConfig(k_value_dtype=vdt, v_value_dtype=vdt, **SMALL), max_cache_len=80)
        with torch.no_grad():
            prefill(model, ids, cache)
        for layer in cache.layers:
            tensors = layer.tensors()
            assert tensors, "an initialised layer lists its tensors"
            for role, t in tensors.items():
                assert getattr(t, "_dynamo_static_input_type", None) is not None, (vdt, role)


def test_full_cache_raises():
    model = _model("tiny-llama")
    cache = MustafarCache(model, MustafarConfig(**SMALL), max_cache_len=50)
    with pytest.raises(ValueError, match="holds 50 tokens"):
        generate(model, _ids(), cache, 20)
    cache = MustafarCache(model, MustafarConfig(**SMALL), max_cache_len=50)
    generate(model, _ids(), cache, 10)  # 49 tokens held after the last forward
    with pytest.raises(ValueError, match="is full"):
        cache.update(torch.randn(2, cache.num_kv_heads, 2, cache.head_dim), torch.randn(2, cache.num_kv_heads, 2, cache.head_dim), 0)


def test_only_per_token_magnitude_is_static():
    assert static_capable(MustafarConfig())
    assert not static_capable(MustafarConfig(mode="simulate"))
    assert not static_capable(MustafarConfig(k_strategy="semi_structured_2_4", k_sparsity=0.5))
    model = _model("tiny-llama")
    cache = MustafarCache(model, MustafarConfig(k_strategy="semi_structured_2_4", k_sparsity=0.5), max_cache_len=64)
    assert not cache.is_compileable  # the eager preallocated layer
    with pytest.raises(ValueError, match="per_token_magnitude"):
        MustafarStaticLayer(MustafarConfig(mode="simulate"), 2, 64, torch.float32, 64)
