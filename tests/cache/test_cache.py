"""MustafarCache / "mustafar" attention: equivalence with DynamicCache and with the simulate mode.

Tolerances (fp32 models): logits of two paths that should compute the same thing up to summation
order agree within ``ATOL = 1e-4`` absolute (observed ~1e-5 on the tiny presets); tokens are equal.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DynamicCache

import mustafar
from mustafar import ops
from mustafar.cache import MustafarCache, MustafarConfig, MustafarLayer, MustafarSimulatedLayer, cache_kwargs
from mustafar.cache.static import MustafarStaticLayer

ATOL = 1e-4
TINY = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gemma3"]
SMALL = dict(local_window=4, compress_chunk=3)  # exercises prefill compression and decode-time chunks

_MODELS: dict = {}


def _model(name):
    if name not in _MODELS:
        _MODELS[name] = mustafar.load_model(name)
    return _MODELS[name]


def _generate(model, ids, mask, cache, n=10):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # cache_kwargs: the spelling of this transformers version
        out = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(model, cache), max_new_tokens=n,
                             do_sample=False, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=0)
    return out.sequences, torch.stack(out.scores, dim=1)  # [B, T_total], [B, n, V]


def _left_pad(prompts):
    """Batch 1-D token tensors with left padding: ``ids, mask [B, max_len]``."""
    t = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), t, dtype=torch.long)
    mask = torch.zeros(len(prompts), t, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = p
        mask[i, t - len(p):] = 1
    return ids, mask


def _prompt(model, b=1, t=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (b, t), generator=g)
    return ids, torch.ones_like(ids)


# --------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kw, bad", [
    (dict(k_sparsity=1.0), "k_sparsity"), (dict(v_sparsity=-0.1), "v_sparsity"), (dict(k_sparsity="a"), "k_sparsity"),
    (dict(local_window=-1), "local_window"), (dict(compress_chunk=0), "compress_chunk"), (dict(mode="dense"), "mode"),
    (dict(decode_kernel="v9"), "decode_kernel"), (dict(decode_kernel=None), "decode_kernel"),
    (dict(k_strategy="nope"), "k_strategy"), (dict(v_strategy="per_channel_magnitude"), "v_strategy"),
    (dict(v_strategy="think", mode="simulate"), "v_strategy"),
    (dict(k_strategy="output_aware", k_strategy_kwargs={"q": None}), "k_strategy_kwargs"),
    (dict(v_strategy="output_aware", v_strategy_kwargs={"kind": "key"}), "kind"),
    (dict(k_strategy="semi_structured_2_4", k_sparsity=0.7), "k_sparsity"),
])
def test_config_rejects_bad_values(kw, bad):
    with pytest.raises(ValueError, match=bad):
        MustafarConfig(**kw)


def test_config_simulate_accepts_per_channel():
    cfg = MustafarConfig(k_strategy="per_channel_magnitude", mode="simulate")
    assert cfg.k_strategy == "per_channel_magnitude"


# ------------------------------------------------------------------------------- equivalence checks
@pytest.mark.parametrize("mode", ["compressed", "simulate"])
def test_sparsity_zero_equals_dynamic_cache(mode):
    model, _ = _model("tiny-llama")
    ids, mask = _prompt(model)
    ref_tok, ref_logits = _generate(model, ids, mask, DynamicCache())
    cache = MustafarCache(model, MustafarConfig(k_sparsity=0.0, v_sparsity=0.0, mode=mode, **SMALL))
    tok, logits = _generate(model, ids, mask, cache)
    assert torch.equal(tok, ref_tok)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_compressed_equals_simulate(name):
    model, _ = _model(name)
    ids, mask = _prompt(model)
    out = {}
    for mode in ("compressed", "simulate"):
        cache = MustafarCache(model, MustafarConfig(k_sparsity=0.7, v_sparsity=0.7, mode=mode, **SMALL))
        out[mode] = _generate(model, ids, mask, cache)
    assert torch.equal(out["compressed"][0], out["simulate"][0])
    torch.testing.assert_close(out["compressed"][1], out["simulate"][1], atol=ATOL, rtol=0)
    # pruning is real: 70% sparsity changes the logits against the dense cache
    ref = _generate(model, ids, mask, DynamicCache())
    assert (out["simulate"][1] - ref[1]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["compressed", "simulate"])
def test_batched_left_padding_equals_single(mode):
    model, _ = _model("tiny-llama")
    lens = [40, 23, 31]
    prompts = [_prompt(model, t=n, seed=i)[0][0] for i, n in enumerate(lens)]
    ids, mask = _left_pad(prompts)
    t = ids.shape[1]
    cfg = MustafarConfig(k_sparsity=0.7, v_sparsity=0.7, mode=mode, **SMALL)
    b_tok, b_logits = _generate(model, ids, mask, MustafarCache(model, cfg))
    for i, p in enumerate(prompts):
        s_tok, s_logits = _generate(model, p[None], torch.ones_like(p)[None], MustafarCache(model, cfg))
        assert torch.equal(b_tok[i, t:], s_tok[0, len(p):])
        torch.testing.assert_close(b_logits[i], s_logits[0], atol=ATOL, rtol=0)


def test_multi_turn_compressed_equals_simulate():
    model, _ = _model("tiny-qwen2")
    ids, mask = _prompt(model, t=30)
    follow = _prompt(model, t=9, seed=5)[0]
    outs = {}
    for mode in ("compressed", "simulate"):
        cache = MustafarCache(model, MustafarConfig(k_sparsity=0.7, v_sparsity=0.7, mode=mode, **SMALL))
        tok1, lg1 = _generate(model, ids, mask, cache, n=6)
        ids2 = torch.cat([tok1, follow], dim=1)  # second turn: the cache holds tok1[:, :-1]
        tok2, lg2 = _generate(model, ids2, torch.ones_like(ids2), cache, n=6)
        assert cache.get_seq_length() == ids2.shape[1] + 5
        outs[mode] = (tok2, torch.cat([lg1, lg2], dim=1))
    assert torch.equal(outs["compressed"][0], outs["simulate"][0])
    torch.testing.assert_close(outs["compressed"][1], outs["simulate"][1], atol=ATOL, rtol=0)


def test_decode_reads_compressed_store(monkeypatch):
    """Decode steps call sparse_decode, never decode_bitmap, and append without moving the store."""
    model, _ = _model("tiny-llama")
    ids, mask = _prompt(model)
    cache = MustafarCache(model, MustafarConfig(**SMALL), max_cache_len=64)
    tok, _ = _generate(model, ids, mask, cache, n=1)  # prefill (+ its first token)
    layer = cache.layers[0]
    ptrs = (layer.k_bitmap.data_ptr(), layer.k_vals.data_ptr(), layer.v_vals.data_ptr())
    stored = layer.k_vals[:, :, : layer.n_c].clone()
    calls = {"sparse": 0, "decode": 0}
    real_sd, real_db = ops.sparse_decode, ops.decode_bitmap

    def sd(*a, **k):
        calls["sparse"] += 1
        return real_sd(*a, **k)

    def db(*a, **k):
        calls["decode"] += 1
        return real_db(*a, **k)

    monkeypatch.setattr(ops, "sparse_decode", sd)
    monkeypatch.setattr(ops, "decode_bitmap", db)
    n_c0 = layer.n_c
    nxt = tok[:, -1:]  # [1, 1]
    for _ in range(7):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            out = model(input_ids=nxt, **cache_kwargs(model, cache), use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    assert calls["decode"] == 0
    assert calls["sparse"] == 7 * model.config.num_hidden_layers
    assert layer.n_c > n_c0  # decode-time chunks were compressed
    assert (layer.k_bitmap.data_ptr(), layer.k_vals.data_ptr(), layer.v_vals.data_ptr()) == ptrs
    assert torch.equal(layer.k_vals[:, :, : stored.shape[2]], stored)  # nothing stored was rewritten


@pytest.mark.parametrize("max_len", [None, 61])
def test_store_capacity_keeps_slices_16_byte_aligned(max_len):
    """The compressed store's capacity is a multiple of 8 rows: every (batch, head) slice of the values
    starts 16-byte aligned for any k (the CUDA kernels' 16-byte staging), with or without max_cache_len."""
    model, _ = _model("tiny-llama")
    ids, mask = _prompt(model)
    cfg = MustafarConfig(**{**SMALL, "k_sparsity": 0.7, "v_sparsity": 0.6})
    cache = MustafarCache(model, cfg, max_cache_len=max_len)
    _generate(model, ids, mask, cache, n=3)
    layer = cache.layers[0]
    if max_len is None:
        assert isinstance(layer, MustafarLayer)
        assert layer.cap % 8 == 0 and layer.cap >= layer.n_c
    else:  # the compileable layer: rows = positions, a multiple of 32 (whole 32-row kernel tiles)
        assert isinstance(layer, MustafarStaticLayer)
        assert layer.rows % 32 == 0 and layer.rows >= max_len - cfg.local_window
    for t in (layer.k_vals, layer.v_vals, layer.k_bitmap, layer.v_bitmap):
        assert (t.stride(1) * t.element_size()) % 16 == 0, (tuple(t.shape), t.stride())
        assert t.data_ptr() % 16 == 0


def test_window_buffer_grows_on_demand_and_matches_simulate():
    """Without max_cache_len the dense window buffer holds the window rounded up to 16 rows (never more
    than local_window + compress_chunk + 1); the tokens equal simulate mode across growth and shrinking."""
    model, _ = _model("tiny-llama")
    ids, mask = _prompt(model, t=6)  # shorter than the window: nothing compressed at prefill
    cfg = dict(k_sparsity=0.7, v_sparsity=0.7, local_window=8, compress_chunk=16)
    outs = {}
    for mode in ("compressed", "simulate"):
        cache = MustafarCache(model, MustafarConfig(mode=mode, **cfg))
        tok, lg = _generate(model, ids, mask, cache, n=1)
        if mode == "compressed":
            layer = cache.layers[0]
            assert layer.n_w == 6 and layer.k_win.shape[2] == 16  # short prompt: 6 rows -> a 16-row buffer
        tok2, lg2 = _generate(model, tok, torch.ones_like(tok), cache, n=30)  # grows, then compresses
        if mode == "compressed":
            assert layer.n_c > 0 and layer.n_w + 16 > layer.k_win.shape[2] >= layer.n_w
            assert layer.k_win.shape[2] <= 8 + 16 + 1
        outs[mode] = (tok2, torch.cat([lg, lg2], dim=1))
    assert torch.equal(outs["compressed"][0], outs["simulate"][0])
    torch.testing.assert_close(outs["compressed"][1], outs["simulate"][1], atol=ATOL, rtol=0)


def test_static_cache_decode_unchanged_by_mustafar_attention():
    """A model switched to the "mustafar" attention (every MustafarCache does that) still decodes a
    transformers StaticCache exactly as sdpa does: a StaticCache reports its capacity as kv_length, so its
    decode steps need the causal mask over the unfilled tail (the mask function once skipped it)."""
    from transformers import StaticCache

    model, _ = mustafar.load_model("tiny-llama")  # a fresh copy: sdpa
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=gen)

    def decode_logits():
        cache = StaticCache(config=model.config, max_cache_len=64)
        with torch.inference_mode():
            out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            pos = torch.full((2, 1), ids.shape[1])
            return model(input_ids=nxt, **cache_kwargs(model, cache), use_cache=True, position_ids=pos).logits

    ref = decode_logits()
    mustafar.cache.attention.prepare_model(model)
    assert model.config._attn_implementation == mustafar.cache.attention.ATTN_NAME
    torch.testing.assert_close(decode_logits(), ref, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------- errors
def test_attention_detects_lost_compressed_store():
    """A model that replaced the keys between cache.update and attention must not silently drop the store."""
    from mustafar.cache.attention import HANDOFF_ATTR, mustafar_attention_forward
    from mustafar.cache.handoff import Handoff, Note

    module = torch.nn.Module()
    module.layer_idx = 0
    handoff = Handoff()
    module.__dict__[HANDOFF_ATTR] = handoff
    q = torch.randn(1, 2, 1, 64)
    k = torch.randn(1, 2, 5, 64)
    handoff.post(0, Note(layer=None, key=k.clone(), store={"head_dim": 64}), owner=None)  # update returned another tensor
    with pytest.raises(RuntimeError, match="changed the keys"):
        mustafar_attention_forward(module, q, k, k.clone(), None, scaling=0.125)
    out, _ = mustafar_attention_forward(module, q, k, k.clone(), None, scaling=0.125)  # no note: dense sdpa
    assert out.shape == (1, 1, 2, 64)


def _tiny_llama_cfg(**over):
    from transformers import LlamaConfig

    kw = dict(hidden_size=128, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, vocab_size=64)
    kw.update(over)
    return LlamaConfig(**kw)


def test_rejects_bad_head_dim():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(_tiny_llama_cfg(num_attention_heads=4, head_dim=32)).eval()
    with pytest.raises(ValueError, match="head_dim=32"):
        MustafarCache(model, MustafarConfig())


def test_rejects_bad_dtype():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(_tiny_llama_cfg()).to(torch.float64).eval()
    with pytest.raises(ValueError, match="float64"):
        MustafarCache(model, MustafarConfig())


def test_rejects_non_kv_models():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, MambaConfig, MambaForCausalLM

    mla = DeepseekV3ForCausalLM(DeepseekV3Config(
        hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=16, qk_nope_head_dim=48,
        v_head_dim=64, vocab_size=64, n_routed_experts=2, num_experts_per_tok=1, first_k_dense_replace=1))
    with pytest.raises(ValueError, match="latent"):
        MustafarCache(mla, MustafarConfig())
    ssm = MambaForCausalLM(MambaConfig(hidden_size=64, num_hidden_layers=1, vocab_size=64, state_size=4))
    with pytest.raises(ValueError, match="KV cache|head_dim|attention"):
        MustafarCache(ssm, MustafarConfig())
    with pytest.raises(ValueError, match="PreTrainedModel"):
        MustafarCache(torch.nn.Linear(2, 2), MustafarConfig())
    with pytest.raises(ValueError, match="MustafarConfig"):
        MustafarCache(_model("tiny-llama")[0], {"k_sparsity": 0.5})


def test_rejects_reuse_across_models():
    from transformers import LlamaForCausalLM

    model, _ = _model("tiny-llama")
    cache = MustafarCache(model, MustafarConfig(**SMALL))
    assert model.config.num_key_value_heads != 1
    other = LlamaForCausalLM(_tiny_llama_cfg(num_key_value_heads=1, num_hidden_layers=model.config.num_hidden_layers))
    ids = torch.randint(3, 64, (1, 8))
    with pytest.raises(ValueError, match="H_kv"):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            mustafar.cache.attention.prepare_model(other)
            other(input_ids=ids, **cache_kwargs(other, cache), use_cache=True)


# -------------------------------------------------------------------------------------- accounting
def _all_tensors(cache):
    out = []
    for layer in cache.layers:
        if isinstance(layer, MustafarLayer):
            out += [layer.k_bitmap, layer.v_bitmap, layer.k_vals, layer.v_vals, layer.k_win, layer.v_win, layer.counts]
        elif isinstance(layer, MustafarSimulatedLayer):
            out += [layer.k_buf, layer.v_buf, layer.counts]
        else:
            out += [layer.keys, layer.values]
    return out


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_nbytes_accounting_exact(name):
    model, _ = _model(name)
    ids, mask = _prompt(model, b=2)
    for mode in ("compressed", "simulate"):
        cache = MustafarCache(model, MustafarConfig(mode=mode, **SMALL))
        _generate(model, ids, mask, cache, n=5)
        assert cache.held_nbytes() == sum(t.nbytes for t in _all_tensors(cache))
        bd = cache.breakdown()
        assert bd["total"] == cache.held_nbytes() and bd["reported"] == cache.nbytes()
        if mode == "compressed":
            assert cache.nbytes() == cache.held_nbytes()
        dyn = DynamicCache(config=model.config)
        _generate(model, ids, mask, dyn, n=5)
        assert cache.dense_nbytes() == sum(l.keys.nbytes + l.values.nbytes for l in dyn.layers)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_simulate_nbytes_is_the_compressed_equivalent(name):
    """Simulate mode reports what compressed mode holds for the same tokens: the exact bitmap rows and
    the window, without compressed mode's capacity slack (held dense buffers: held_nbytes())."""
    model, _ = _model(name)
    ids, mask = _prompt(model, b=2, t=70)
    caches = {}
    for mode in ("compressed", "simulate"):
        caches[mode] = MustafarCache(model, MustafarConfig(mode=mode, **SMALL))
        _generate(model, ids, mask, caches[mode], n=5)
    comp, sim = caches["compressed"], caches["simulate"]
    used = sum(l.k_win[:, :, : l.n_w].nbytes * 2 + l.counts.nbytes for l in comp.layers if isinstance(l, MustafarLayer))
    used += comp.breakdown()["payload_used"] + comp.breakdown()["bitmaps_used"]
    used += sum(l.keys.nbytes + l.values.nbytes for l in comp.layers if not isinstance(l, MustafarLayer))
    assert sim.nbytes() == used <= comp.nbytes()
    assert sim.held_nbytes() > sim.nbytes()


def test_compressed_bytes_at_70_percent():
    """head_dim 64, fp32 here: compressed rows cost (8*W + k*4) / (D*4) of dense; at 70% k=19 -> 0.328."""
    model, _ = _model("tiny-llama")
    ids, mask = _prompt(model, t=100)
    cache = MustafarCache(model, MustafarConfig(k_sparsity=0.7, v_sparsity=0.7, **SMALL))
    _generate(model, ids, mask, cache, n=2)
    bd = cache.breakdown()
    layer = cache.layers[0]
    dense_rows = 2 * layer.batch_size * layer.num_kv_heads * layer.n_c * layer.head_dim * 4 * len(cache.layers)
    ratio = (bd["payload_used"] + bd["bitmaps_used"]) / dense_rows
    assert abs(ratio - (8 + 19 * 4) / (64 * 4)) < 1e-9
    assert ratio <= 0.40


# ------------------------------------------------------------------------------------------ headline
def _long_english_prompt(tok, n_tokens=1600):
    """Real English text shipped with CPython: the pydoc topics of the Python reference manual."""
    from pydoc_data.topics import topics

    text = ""
    for key in ("compound", "customization", "attribute-access", "specialnames", "types"):
        text += topics[key] + "\n"
        if len(tok(text).input_ids) >= n_tokens:
            break
    ids = tok(text, return_tensors="pt").input_ids[:, :n_tokens]
    return ids


@pytest.mark.slow
def test_smollm2_long_prompt_compressed_equals_simulate():
    model, tok = _model("smollm2-135m")
    ids = _long_english_prompt(tok)
    assert ids.shape[1] >= 1500
    mask = torch.ones_like(ids)
    out = {}
    for mode in ("compressed", "simulate"):
        cache = MustafarCache(model, MustafarConfig(k_sparsity=0.7, v_sparsity=0.7, mode=mode))
        out[mode] = _generate(model, ids, mask, cache, n=64)
    assert torch.equal(out["compressed"][0], out["simulate"][0])
    torch.testing.assert_close(out["compressed"][1], out["simulate"][1], atol=ATOL, rtol=0)
    ref = _generate(model, ids, mask, DynamicCache(), n=16)  # sparsity 0: 16 tokens suffice (keeps it cheaper)
    for mode in ("compressed", "simulate"):
        cache = MustafarCache(model, MustafarConfig(k_sparsity=0.0, v_sparsity=0.0, mode=mode))
        tok0, lg0 = _generate(model, ids, mask, cache, n=16)
        assert torch.equal(tok0, ref[0])
        torch.testing.assert_close(lg0, ref[1], atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------ query-driven strategies
OA, THINK = "output_aware", "think"
_CHAN6 = {"granularity": "per_channel", "group_size": 6}
# (k_strategy, k_kwargs, v_strategy, v_kwargs, modes it can run in)
QUERY_CASES = {
    "oa-tok": (OA, {}, OA, {}, ("compressed", "simulate")),
    "think+oa-tok": (THINK, {}, OA, {}, ("compressed", "simulate")),
    "think+mag": (THINK, {"obs_window": 8}, "per_token_magnitude", {}, ("compressed", "simulate")),
    "oa-chan": (OA, _CHAN6, OA, _CHAN6, ("simulate",)),
}


def _qcfg(case, mode, sp=0.7, **over):
    ks, kkw, vs, vkw, _ = QUERY_CASES[case]
    kw = dict(k_sparsity=sp, v_sparsity=sp, k_strategy=ks, v_strategy=vs, k_strategy_kwargs=dict(kkw),
              v_strategy_kwargs=dict(vkw), mode=mode, **SMALL)
    kw.update(over)
    return MustafarConfig(**kw)


@pytest.mark.parametrize("kw", [
    dict(k_strategy="output_aware", k_strategy_kwargs={"granularity": "per_channel"}),
    dict(v_strategy="output_aware", v_strategy_kwargs={"granularity": "per_channel"}),
    dict(k_strategy="per_channel_magnitude"),
])
def test_config_compressed_rejects_variable_budget(kw):
    side = next(iter(kw))[:1]
    with pytest.raises(ValueError, match=rf"{side}_strategy='{kw[side + '_strategy']}'.*mode='simulate'"):
        MustafarConfig(mode="compressed", **kw)
    assert MustafarConfig(mode="simulate", **kw).mode == "simulate"


@pytest.mark.parametrize("case", list(QUERY_CASES))
def test_query_driven_generate(case):
    """Every query-driven strategy runs end to end in its modes; where both exist they agree (ATOL)."""
    model, _ = _model("tiny-llama")
    ids, mask = _prompt(model)
    ref = _generate(model, ids, mask, DynamicCache(), n=12)
    out = {}
    for mode in QUERY_CASES[case][-1]:
        cache = MustafarCache(model, _qcfg(case, mode))
        out[mode] = _generate(model, ids, mask, cache, n=12)  # 40 + 12 tokens: prefill + decode-time chunks
        layer = cache.layers[0]
        assert layer.n_c == 40 + 11 - layer.n_w and layer.n_c > 40 - 4  # decode chunks were compressed
        assert (out[mode][1] - ref[1]).abs().max() > 1e-3  # pruning is real
    if len(out) == 2:
        assert torch.equal(out["compressed"][0], out["simulate"][0])
        torch.testing.assert_close(out["compressed"][1], out["simulate"][1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("case, sp", [("oa-tok", 0.5), ("think+oa-tok", 0.5), ("think+oa-tok", 0.6)])
def test_query_driven_compressed_equals_simulate_sparsities(case, sp):
    model, _ = _model("tiny-llama")
    ids, mask = _prompt(model, seed=3)
    out = {m: _generate(model, ids, mask, MustafarCache(model, _qcfg(case, m, sp)), n=8)
           for m in ("compressed", "simulate")}
    assert torch.equal(out["compressed"][0], out["simulate"][0])
    torch.testing.assert_close(out["compressed"][1], out["simulate"][1], atol=ATOL, rtol=0)


def _prefill(model, cache, ids):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)


@pytest.mark.parametrize("case", list(QUERY_CASES))
def test_query_driven_prefill_matches_prune(case):
    """Simulate-mode rows pruned at prefill == mustafar.prune on the captured K/V with the captured queries."""
    from mustafar.capture import capture_qkv
    from mustafar.pruning import prune

    model, _ = _model("tiny-llama")
    ids, _ = _prompt(model)  # T = 40, local_window 4 -> 36 rows pruned (6 groups of 6 for per-channel)
    cap = capture_qkv(model, ids)
    ks, kkw, vs, vkw, _ = QUERY_CASES[case]
    cache = MustafarCache(model, _qcfg(case, "simulate"))
    _prefill(model, cache, ids)
    for i, layer in enumerate(cache.layers):
        q, k, v = cap[i]["q"], cap[i]["k"], cap[i]["v"]
        n = layer.n_c
        assert n == 36 and layer.n_w == 4
        kq = dict(q=q) if ks in (OA, THINK) else {}
        vq = dict(q=q, k=k, kind="value") if vs == OA else {}
        want_k = prune(k, 0.7, ks, **kq, **kkw)[:, :, :n]
        want_v = prune(v, 0.7, vs, **vq, **vkw)[:, :, :n]
        assert torch.equal(layer.k_buf[:, :, :n], want_k), (i, "K")
        assert torch.equal(layer.v_buf[:, :, :n], want_v), (i, "V")
        assert torch.equal(layer.k_buf[:, :, n:40], k[:, :, n:])  # the window stays dense
        # the compressed store encodes the same rows (per-token cases)
        if "compressed" in QUERY_CASES[case][-1]:
            cc = MustafarCache(model, _qcfg(case, "compressed"))
            _prefill(model, cc, ids)
            cl = cc.layers[i]
            torch.testing.assert_close(ops.decode_bitmap(cl.k_bitmap[:, :, :n], cl.k_vals[:, :, :n], 64), want_k,
                                       atol=1e-5, rtol=0)


def test_query_driven_replay_with_query_states():
    """cache.update(k, v, i, {"query_states": q}) (no attention call) == the model's own prefill."""
    from mustafar.capture import capture_qkv

    model, _ = _model("tiny-llama")
    ids, _ = _prompt(model)
    cap = capture_qkv(model, ids)
    for case in ("oa-tok", "think+oa-tok"):
        real = MustafarCache(model, _qcfg(case, "compressed"))
        _prefill(model, real, ids)
        replay = MustafarCache(model, _qcfg(case, "compressed"))
        for i in range(len(replay.layers)):
            replay.update(cap[i]["k"], cap[i]["v"], i, {"query_states": cap[i]["q"]})
        for a, b in zip(real.layers, replay.layers):
            assert (a.n_c, a.n_w) == (b.n_c, b.n_w)
            for name, t in a.tensors().items():
                torch.testing.assert_close(b.tensors()[name], t, atol=1e-5, rtol=0, msg=name)
    # without queries and without attention, the next call says what is missing
    cache = MustafarCache(model, _qcfg("oa-tok", "compressed"))
    cache.update(cap[0]["k"], cap[0]["v"], 0)
    assert cache.get_seq_length(0) == 40
    with pytest.raises(RuntimeError, match="query_states"):
        cache.update(cap[0]["k"][:, :, :1], cap[0]["v"][:, :, :1], 0)


def test_output_aware_key_scores_at_decode_time():
    """Rows compressed during decode are scored with |Q| summed over their `window` following queries.

    Layer 0's queries and keys do not depend on the cache, so a dense capture of the generated sequence
    gives them; window=3 <= local_window + 1, so every decode-compressed row has seen all its queries.
    """
    from mustafar.capture import capture_qkv
    from mustafar.pruning import prune

    model, _ = _model("tiny-llama")
    ids, mask = _prompt(model, t=30)
    cfg = MustafarConfig(k_strategy=OA, k_strategy_kwargs={"window": 3}, v_sparsity=0.0, mode="simulate", **SMALL)
    cache = MustafarCache(model, cfg)
    seq, _ = _generate(model, ids, mask, cache, n=15)
    layer = cache.layers[0]
    n = layer.n_c
    assert n > 30  # rows were compressed during decode
    cap = capture_qkv(model, seq[:, :-1], layers=[0])[0]
    want = prune(cap["k"], 0.7, OA, q=cap["q"], window=3)[:, :, :n]
    assert torch.equal(layer.k_buf[:, :, :n] != 0, want != 0)
    torch.testing.assert_close(layer.k_buf[:, :, :n], want, atol=1e-5, rtol=0)


def test_output_aware_value_scores_at_decode_time(monkeypatch):
    """Rows compressed during decode: |V| x attention received from every query seen before compression.

    K is kept dense (k_sparsity 0), so layer 0's attention probabilities equal the dense ones of a
    capture of the generated sequence; per-channel granularity makes the ranking depend on them.
    """
    from mustafar.capture import capture_qkv
    from mustafar.cache.layers import MustafarLayerBase as _MustafarLayerBase
    from mustafar.pruning.select import group_channel_mask

    model, _ = _model("tiny-llama")
    ids, mask = _prompt(model, t=30, seed=7)
    cfg = MustafarConfig(k_sparsity=0.0, v_strategy=OA, v_strategy_kwargs=_CHAN6, mode="simulate", **SMALL)
    cache = MustafarCache(model, cfg)
    events = []  # (first row, rows, sequence length) of every decode-time chunk of layer 0
    real = _MustafarLayerBase._chunk_masks

    def spy(self, n):
        if self is cache.layers[0]:
            events.append((self.n_c, n, self.n_c + self.n_w))
        return real(self, n)

    monkeypatch.setattr(_MustafarLayerBase, "_chunk_masks", spy)
    seq, _ = _generate(model, ids, mask, cache, n=12)
    assert len(events) >= 2
    cap = capture_qkv(model, seq[:, :-1], layers=[0])[0]
    q, k, v = cap["q"], cap["k"], cap["v"]
    B, H, T, D = k.shape
    G = q.shape[1] // H
    s = (q.reshape(B, H, G, T, D) @ k[:, :, None].transpose(-1, -2)) * D**-0.5  # [B, H, G, T_q, T]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(s, -1).sum(2)  # [B, H, T_q, T]
    layer = cache.layers[0]
    for start, n, length in events:
        a = p[:, :, : length - 1, start : start + n].sum(2)  # queries before this step's (not yet seen)
        rows = v[:, :, start : start + n]
        keep = group_channel_mask(rows.abs() * a[..., None], 0.7, 6)
        torch.testing.assert_close(layer.v_buf[:, :, start : start + n], torch.where(keep, rows, 0.0),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["think+oa-tok"])
def test_query_driven_left_padding_equals_single(case):
    """Padding tokens neither vote in ThinK's channel scores nor receive/give attention in V scores."""
    model, _ = _model("tiny-llama")
    lens = [40, 29]
    prompts = [_prompt(model, t=n, seed=10 + i)[0][0] for i, n in enumerate(lens)]
    ids, mask = _left_pad(prompts)
    t = ids.shape[1]
    cfg = _qcfg(case, "compressed")
    b_tok, b_logits = _generate(model, ids, mask, MustafarCache(model, cfg), n=8)
    for i, p in enumerate(prompts):
        s_tok, s_logits = _generate(model, p[None], torch.ones_like(p)[None], MustafarCache(model, cfg), n=8)
        assert torch.equal(b_tok[i, t:], s_tok[0, len(p):])
        torch.testing.assert_close(b_logits[i], s_logits[0], atol=ATOL, rtol=0)


def test_query_driven_chunked_prefill_matches_reference():
    """Two multi-token calls (20 + 20 tokens): window rows of call 1 get call 2's queries added (layer 0)."""
    from mustafar.capture import capture_qkv
    from mustafar.pruning import prune
    from mustafar.pruning.select import group_channel_mask

    model, _ = _model("tiny-llama")
    ids, _ = _prompt(model, seed=4)
    cap = capture_qkv(model, ids, layers=[0])[0]
    q, k, v = cap["q"], cap["k"], cap["v"]
    B, H, T, D = k.shape
    G = q.shape[1] // H
    caches = {}
    for side, cfg in (("k", MustafarConfig(k_strategy=OA, k_strategy_kwargs={"window": 3}, v_sparsity=0.0,
                                           mode="simulate", **SMALL)),
                      ("v", MustafarConfig(k_sparsity=0.0, v_strategy=OA, v_strategy_kwargs=_CHAN6, mode="simulate",
                                           **SMALL))):
        caches[side] = MustafarCache(model, cfg)
        _prefill(model, caches[side], ids[:, :20])
        _prefill(model, caches[side], ids[:, 20:])
    layer = caches["k"].layers[0]
    assert layer.n_c == 36
    want_k = prune(k, 0.7, OA, q=q, window=3)  # every row's 3 following queries exist by the time it is pruned
    assert torch.equal(layer.k_buf[:, :, :36], want_k[:, :, :36])
    s = (q.reshape(B, H, G, T, D) @ k[:, :, None].transpose(-1, -2)) * D**-0.5  # [B, H, G, T, T]
    p = torch.softmax(s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")), -1).sum(2)
    layer = caches["v"].layers[0]
    for lo, hi, n_q in ((0, 16, 20), (16, 36, 40)):  # rows pruned by call 1 / call 2, queries seen by then
        a = p[:, :, :n_q, lo:hi].sum(2)  # [B, H, rows]
        rows = v[:, :, lo:hi]
        keep = group_channel_mask(rows.abs() * a[..., None], 0.7, 6)
        torch.testing.assert_close(layer.v_buf[:, :, lo:hi], torch.where(keep, rows, 0.0), atol=1e-5, rtol=0)
