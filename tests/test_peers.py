"""Peers runner (mustafar.eval.peers, issue #17): byte accounting, CI, prompt split, kvpress equivalence.

The kvpress tests run in the peers environment (``make peers`` builds ``.venv/peers``) and skip
where kvpress is absent (the main environment); the rest runs everywhere on CPU in a few seconds.
"""
from __future__ import annotations

import math

import pytest
import torch

from mustafar.eval import peers


def test_wilson_known_values():
    lo, hi = peers.wilson(0.5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    lo, hi = peers.wilson(1.0, 2)
    assert hi == 1.0 and lo == pytest.approx(0.3424, abs=1e-3)
    assert peers.wilson(0.0, 4)[0] == 0.0
    assert peers.wilson(0.3, 0) == (0.0, 1.0)


def test_keep_ratios_are_mustafar_format_ratios():
    from mustafar.format import format_bytes_ratio

    k = peers.keep_ratios(64)
    assert k[0] == format_bytes_ratio(64, 0.5) == 72 / 128
    assert k[1] == format_bytes_ratio(64, 0.7) == 46 / 128
    assert k[2] == 0.2
    assert peers.keep_ratios(128)[:2] == (0.5625, 92 / 256)


def test_joint_bytes_ratio():
    # D=64, 50%: 32 kept; 4-bit: 8 B bitmap + 16 B codes + 4 B fp16 scale/min over 128 B
    assert peers.joint_bytes_ratio(64, 0.5, 4) == (8 + 16 + 4) / 128
    assert peers.joint_bytes_ratio(64, 0.5, 2) == (8 + 8 + 4) / 128
    assert peers.joint_bytes_ratio(64, 0.7, 4) == (8 + math.ceil(19 * 4 / 8) + 4) / 128


def test_tensor_bytes_nested():
    a = torch.zeros(3, 4, dtype=torch.float16)
    b = torch.zeros(5, dtype=torch.uint8)
    assert peers.tensor_bytes(a) == 24
    assert peers.tensor_bytes({"x": a, "y": [b, (b, None)], "z": 3}) == 24 + 5 + 5


def test_split_prompt_all_tasks():
    from mustafar.eval import ruler
    from mustafar.eval.runtime import ByteTokenizer

    tok = ByteTokenizer()
    for task in ("niah_single", "niah_multiquery", "fwe", "vt"):
        s = ruler.generate_samples(task, tok, 2000, 1)[0]
        ctx, q = peers.split_prompt(s.user)
        assert ctx + q == s.user and q.startswith("\n") and "\n" not in q[1:]
        assert ("What" in q) or ("Question" in q)


class _ChatTok:
    """Byte tokenizer with a toy chat template (the kvpress split path)."""

    chat_template = "toy"
    bos_token = None

    def apply_chat_template(self, msgs, add_generation_prompt=True, tokenize=False, **kw):
        return "<u>" + msgs[0]["content"] + "</u><a>"

    def encode(self, text, add_special_tokens=False, return_tensors=None):
        ids = list(text.encode())
        return torch.tensor([ids]) if return_tensors == "pt" else ids


def test_preprocess_splits_like_the_pipeline():
    c, q = peers.preprocess(_ChatTok(), "CTX", "\nQ?", "A:")
    assert bytes(c[0].tolist()).decode() == "<u>CTX"
    assert bytes(q[0].tolist()).decode() == "\nQ?</u><a>A:"


def test_fp8_layer_bytes_and_error():
    torch.manual_seed(0)
    L = peers.FP8Layer()
    k, v = torch.randn(1, 3, 40, 64), torch.randn(1, 3, 40, 64)
    L.update(k, v)
    K, V = L.update(torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64))
    assert K.shape == (1, 3, 41, 64) and L.get_seq_length() == 41
    # 1 byte per value + one fp16 scale per token vector, for K and V
    assert peers.tensor_bytes(L.storage()) == 2 * 3 * 41 * (64 + 2)
    rel = (K[..., :40, :] - k).abs().max() / k.abs().max()
    assert rel < 0.07  # e4m3: 3 mantissa bits


def test_kivi_kept_prunes_and_quantizes():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 50, 64)
    y = peers.kivi_kept(x, 0.5, 4, window=8)
    assert torch.equal(y[..., 42:, :], x[..., 42:, :])  # dense window
    nz = (y[..., :42, :] != 0).sum(-1)
    assert int(nz.max()) <= 32
    err = (y[..., :42, :] - x[..., :42, :]).abs()
    kept = y[..., :42, :] != 0
    assert float(err[kept].max()) < float((x.amax(-1) - x.amin(-1)).max()) / 15 + 1e-4


def test_specs_cover_the_brief():
    specs = peers.profile_specs(64)
    names = {s.name for s in specs}
    assert len(names) == len(specs)
    kv = [s for s in specs if s.family == "kvpress"]
    assert {s.method for s in kv} == set(peers.PRESSES)
    assert {round(1 - s.ratio, 4) for s in kv} == {0.5625, 0.3594, 0.2}
    assert {s.qic for s in kv} == {False, True}


def test_runner_dense_and_mustafar_tiny(tmp_path):
    """Two samples of one task through dense + MUSTAFAR on a random-weight model (main env)."""
    from mustafar.eval.runtime import ByteTokenizer
    from mustafar.models import load_model

    model, _ = load_model("tiny-llama")
    specs = [peers.PeerSpec("dense"), peers.PeerSpec("mustafar", "tok", sparsity=0.7),
             peers.PeerSpec("joint", "tok+fp8", sparsity=0.7, nbits=8)]
    if peers.unavailable(specs[1]):  # MustafarCache needs transformers >= 5.17 (not the peers env's 5.2)
        res = peers.run_peers("tiny-llama", "tiny", tmp_path, specs=specs, lengths=[700], samples=1,
                              model_obj=model, tokenizer=ByteTokenizer(), progress=False)
        assert [c["name"] for c in res["cells"]] == ["dense[std]"]
        assert "MUSTAFAR-KV70[std]" in res["notes"]["skipped"]
        pytest.skip(f"MustafarCache unavailable here: {peers.unavailable(specs[1])}")
    res = peers.run_peers("tiny-llama", "tiny", tmp_path, specs=specs, lengths=[700], samples=2,
                          model_obj=model, tokenizer=ByteTokenizer(), progress=False)
    cells = {c["name"]: c for c in res["cells"]}
    assert set(cells) == {"dense[std]", "MUSTAFAR-KV70[std]", "MUSTAFAR-KV70+FP8[std]"}
    for c in cells.values():
        assert c["n"] == 2 and len(c["sample_scores"]) == 2 and 0 <= c["ci95_lo"] <= c["score"] <= c["ci95_hi"]
    assert cells["dense[std]"]["bytes_ratio"] == 1.0
    assert cells["MUSTAFAR-KV70[std]"]["bytes_ratio"] == pytest.approx(46 / 128)
    # fp8 kept values: 8 B bitmap + 19 B e4m3 + 2 B scale per token vector at D = 64 (fp32 model: vs 2 B/value)
    assert cells["MUSTAFAR-KV70+FP8[std]"]["bytes_ratio"] == pytest.approx((8 + 19 + 2) / 128, abs=1e-6)
    assert (tmp_path / "peers_tiny-llama.json").is_file() and (tmp_path / "peers_tiny-llama.csv").is_file()
    assert res["provenance"]["git"] is not None
    # resume: nothing recomputed
    res2 = peers.run_peers("tiny-llama", "tiny", tmp_path, specs=specs, lengths=[700], samples=2,
                           model_obj=model, tokenizer=ByteTokenizer(), progress=False)
    assert len(res2["cells"]) == 3


# ------------------------------------------------------------------------------ peers env only
def _tiny():
    from mustafar.models import load_model

    model, _ = load_model("tiny-llama")
    return model


@pytest.mark.parametrize("name", list(peers.PRESSES))
def test_shared_hook_equals_kvpress_own_hook(name):
    """One shared prefill with every press's compress() == kvpress's own ``with press(model)``."""
    pytest.importorskip("kvpress")
    from transformers import DynamicCache

    model = _tiny()
    torch.manual_seed(0)
    ids = torch.randint(3, 900, (1, 160))
    press = peers.make_press(name, 0.5)
    _, _, comp = peers.shared_prefill(model, ids, {"p": peers.make_press(name, 0.5)})
    cache = DynamicCache(config=model.config)
    old = model.config._attn_implementation
    model.set_attn_implementation("eager")  # ObservedAttention needs it; the shared prefill uses it for all
    try:
        with torch.inference_mode(), press(model):
            model.model(input_ids=ids, past_key_values=cache)
    finally:
        model.set_attn_implementation(old)
    for i, (k, v) in enumerate(comp["p"]):
        assert k.shape[-2] == int(160 * 0.5)
        torch.testing.assert_close(k, cache.layers[i].keys, rtol=0, atol=0)
        torch.testing.assert_close(v, cache.layers[i].values, rtol=0, atol=0)


def test_preprocess_matches_kvpress_pipeline():
    pytest.importorskip("kvpress")
    from kvpress import KVPressTextGenerationPipeline

    tok = _ChatTok()
    tok.model_max_length = 10**9
    pipe = KVPressTextGenerationPipeline.__new__(KVPressTextGenerationPipeline)
    pipe.tokenizer = tok
    ref = pipe.preprocess("CTX words", ["\nWhat?"], "Answer:", max_context_length=10**9)
    c, q = peers.preprocess(tok, "CTX words", "\nWhat?", "Answer:")
    assert torch.equal(c, ref["context_ids"]) and torch.equal(q, ref["questions_ids"][0])


@pytest.mark.parametrize("backend,nbits", [("quanto", 4), ("quanto", 2), ("hqq", 4), ("fp8", 8)])
def test_quantized_cache_real_bytes(backend, nbits):
    if backend == "quanto":
        pytest.importorskip("optimum.quanto")
    if backend == "hqq":
        pytest.importorskip("hqq")
    model = _tiny()
    torch.manual_seed(0)
    T = 256
    keys = [torch.randn(1, 2, T, 64) for _ in range(2)]
    values = [torch.randn(1, 2, T, 64) for _ in range(2)]
    spec = peers.PeerSpec("quant", backend, nbits=nbits)
    try:
        cache, br = peers.build_peer_cache(model, spec, keys, values, {}, 8)
    except TypeError as e:  # transformers without fp16-capable layers
        pytest.skip(str(e))
    per_group = {4: 32, 2: 16, 8: 64}[nbits]  # packed codes per 64 values
    extra = 2 if backend == "fp8" else 4  # fp16 scale (+ fp16 zero / shift)
    assert br == pytest.approx((per_group + extra) / 128, rel=0.02)


# ------------------------------------------------------------------------------ hybrid models (Gemma 3)
def _tiny_gemma_sliding(window: int = 48):
    """tiny-gemma3 with a sliding window shorter than the prompts (layers 0, 2 sliding; 1, 3 global)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mustafar.models import PRESETS

    p = PRESETS["tiny-gemma3"]
    cfg = AutoConfig.for_model(p["model_type"], **dict(p["config"], sliding_window=window))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def test_compressed_layers_hybrid_and_plain():
    assert peers.compressed_layers(_tiny_gemma_sliding()) == [False, True, False, True]
    assert all(peers.compressed_layers(_tiny()))


@pytest.mark.parametrize("spec", [peers.PeerSpec("dense"), peers.PeerSpec("quant", "fp8", nbits=8),
                                  peers.PeerSpec("joint", "tok+kivi", sparsity=0.5, nbits=4)])
def test_replayed_hybrid_cache_decodes_like_the_real_one(spec):
    """A replayed Gemma-3 cache (sliding layers hold window - 1 tokens) decodes exactly like the
    prefill's own cache for dense, and its sliding layers stay dense for every method."""
    from transformers import DynamicCache

    model = _tiny_gemma_sliding()
    ids = torch.randint(3, 900, (1, 120))
    q = torch.randint(3, 900, (1, 7))
    keys, values, _ = peers.shared_prefill(model, ids, {})
    assert keys[0].shape[-2] == 47 and keys[1].shape[-2] == 120  # sliding layer: window - 1
    cache, br = peers.build_peer_cache(model, spec, keys, values, {}, 16, 120)
    assert cache.get_seq_length() == 120
    for i in (0, 2):  # sliding layers: dense, untouched
        assert type(cache.layers[i]).__name__ == "DynamicSlidingWindowLayer"
        torch.testing.assert_close(cache.layers[i].keys, keys[i], rtol=0, atol=0)
    ref = DynamicCache(config=model.config)
    pos = torch.arange(120, 127)[None]
    with torch.inference_mode():
        model.model(input_ids=ids, past_key_values=ref)
        want = model(input_ids=q, past_key_values=ref, position_ids=pos).logits
        got = model(input_ids=q, past_key_values=cache, position_ids=pos).logits
    if spec.family == "dense":
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert br == 1.0
    else:
        assert 0 < br < 0.6 and float((got - want).abs().max()) < 5.0
    dense_tokens = [k.shape[-2] for k in keys]
    brc = peers.cache_bytes_ratio(br, dense_tokens, peers.compressed_layers(model))
    assert brc == pytest.approx((2 * 47 + 2 * 120 * br) / (2 * 47 + 2 * 120))


def test_mustafar_on_hybrid_model_compresses_global_layers_only():
    spec = peers.PeerSpec("mustafar", "tok", sparsity=0.5)
    if peers.unavailable(spec):
        pytest.skip(peers.unavailable(spec))
    from transformers import DynamicCache

    model = _tiny_gemma_sliding()
    ids = torch.randint(3, 900, (1, 120))
    keys, values, _ = peers.shared_prefill(model, ids, {})
    cache, br = peers.build_peer_cache(model, spec, keys, values, {}, 16, 120)
    assert br == 0.5625 and cache.get_seq_length() == 120
    kinds = [type(l).__name__ for l in cache.layers]
    assert kinds[0] == kinds[2] == "DynamicSlidingWindowLayer" and kinds[1] == kinds[3] != kinds[0]
    ref = DynamicCache(config=model.config)
    q = torch.randint(3, 900, (1, 7))
    pos = torch.arange(120, 127)[None]
    with torch.inference_mode():
        model.model(input_ids=ids, past_key_values=ref)
        want = model(input_ids=q, past_key_values=ref, position_ids=pos).logits
        got = model(input_ids=q, past_key_values=cache, position_ids=pos).logits
    assert float((got - want).abs().max()) < 5.0 and torch.isfinite(got).all()


def test_hf_qc_fp8_backend_when_available():
    spec = peers.PeerSpec("quant", "qc-fp8", nbits=8)
    if peers.unavailable(spec):
        pytest.skip(peers.unavailable(spec))
    model = _tiny()
    keys = [torch.randn(1, 2, 64, 64) for _ in range(2)]
    values = [torch.randn(1, 2, 64, 64) for _ in range(2)]
    cache, br = peers.build_peer_cache(model, spec, keys, values, {}, 8, 64)
    assert br == pytest.approx(0.5, abs=0.01)  # 1 byte per value + a per-tensor scale, vs fp16
    k, _ = cache.layers[0].update(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64))
    assert k.shape[-2] == 65 and float((k[..., :64, :] - keys[0]).abs().max()) < 0.3


def test_prompts_file_shares_token_ids(tmp_path):
    """The prompts file keeps one tokenization for both environments; cells record its id hashes."""
    from mustafar.eval.runtime import ByteTokenizer

    f = tmp_path / "prompts.json"
    a = peers.cell_samples(f, "m", ByteTokenizer(), "niah_single", 700, 2)
    b = peers.cell_samples(f, "m", None, "niah_single", 700, 2)  # read back: no tokenizer needed
    assert a == b and len(a) == 2 and f.is_file()
    for s in a:
        c, q = s["ids"]["std"]
        cq, qq = s["ids"]["qic"]
        assert c + q == cq + qq  # the same tokens, split elsewhere
        assert len(qq) < len(q)
    assert peers.build_samples(ByteTokenizer(), "niah_single", 700, 2) == a


@pytest.mark.parametrize("name", ["ExpectedAttention", "SnapKV", "ObservedAttention"])
def test_presses_run_on_hybrid_model(name):
    """Gemma-3-style model: only the global layers are compressed (kvpress's Gemma 3 rule)."""
    pytest.importorskip("kvpress")
    model = _tiny_gemma_sliding()
    ids = torch.randint(3, 900, (1, 120))
    key = (name, 0.5)
    keys, values, comp = peers.shared_prefill(model, ids, {key: peers.make_press(name, 0.5)})
    assert comp[key][0] is None and comp[key][2] is None
    assert comp[key][1][0].shape[-2] == comp[key][3][0].shape[-2] == 60
    cache, br = peers.build_peer_cache(model, peers.PeerSpec("kvpress", name, ratio=0.5), keys, values, comp, 8, 120)
    assert br == 0.5 and cache.layers[0].keys.shape[-2] == 47
