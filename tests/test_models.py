"""Tests of mustafar.models (load_model, presets) and mustafar.capture (capture_qkv)."""

import math
import time

import pytest
import torch

from mustafar.capture import attention_modules, capture_qkv
from mustafar.models import PRESETS, list_models, load_model

TINY = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gemma3"]


def ids(B=2, T=24, seed=0, vocab=1000):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- presets
@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_load_and_are_deterministic(name):
    m1, tok = load_model(name)
    m2, _ = load_model(name)
    assert tok is None and not m1.training
    c = m1.config
    assert c.head_dim == 64 and c.num_attention_heads == 4 and c.num_key_value_heads == 2
    assert 2 <= c.num_hidden_layers <= 4 and c.vocab_size == 1000
    x = ids()
    with torch.no_grad():
        l1, l2 = m1(x).logits, m2(x).logits
    assert l1.shape == (2, 24, 1000) and l1.dtype == torch.float32 and torch.isfinite(l1).all()
    assert torch.equal(l1, l2)  # seeded init
    assert l1.std() > 0.1  # not a degenerate (near-zero) random model


def test_preset_dtype():
    m, _ = load_model("tiny-llama", dtype=torch.bfloat16)
    assert next(m.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "name,layers,hq,hkv,vocab,theta,params",
    [
        ("llama2-7b", 32, 32, 32, 32000, 1e4, 6.74e9),
        ("llama3-8b", 32, 32, 8, 128256, 5e5, 8.03e9),
        ("mistral-7b", 32, 32, 8, 32000, 1e6, 7.24e9),
    ],
)
def test_large_preset_configs_on_meta(name, layers, hq, hkv, vocab, theta, params):
    m, tok = load_model(name, dtype=torch.float16, device="meta")  # shapes only, no memory
    c = m.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (layers, hq, hkv, vocab)
    assert c.hidden_size == 4096 and c.head_dim == 128 and c.rope_parameters["rope_theta"] == theta
    n = sum(p.numel() for p in m.parameters())
    assert abs(n / params - 1) < 0.01, n
    assert tok is None and set(PRESETS) >= {name}


def test_list_models():
    names = list_models()
    assert "smollm2-135m" in names and set(TINY) <= set(names) and "llama3-8b" in names


# ---------------------------------------------------------------- errors and local dirs
def test_unknown_name_lists_available():
    with pytest.raises(ValueError) as e:
        load_model("no-such-model")
    assert "no-such-model" in str(e.value) and "tiny-llama" in str(e.value) and "smollm2-135m" in str(e.value)


def test_missing_hub_model_says_how_to_supply(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ValueError) as e:
        load_model("nobody-xyz/missing-model-123")
    msg = str(e.value)
    assert "nobody-xyz/missing-model-123" in msg and "local directory" in msg


def test_bad_arguments():
    with pytest.raises(ValueError, match="int64"):
        load_model("tiny-llama", dtype=torch.int64)
    with pytest.raises(ValueError, match="not-a-device"):
        load_model("tiny-llama", device="not-a-device")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(".")


def test_local_directory_roundtrip(tiny_llama, tmp_path):
    model, _ = tiny_llama
    model.save_pretrained(tmp_path)
    m2, tok = load_model(tmp_path)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(m2(x).logits, model(x).logits, rtol=0, atol=1e-6)
    assert tok is None


# ---------------------------------------------------------------- SmolLM2
@pytest.mark.slow  # first load on a machine dequantizes the GGUF (~30-50 s); cached loads take ~1 s
def test_smollm2_answers_and_shows_key_outlier_channels(smollm2):
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.head_dim == 64
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    x = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(x, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, x.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
    # the paper's observation: a few key channels are outliers, values are flat
    text = "The quick brown fox jumps over the lazy dog. " * 8
    cap = capture_qkv(model, tok(text, return_tensors="pt")["input_ids"], layers=[5])[5]
    kc = cap["k"].abs().amax(dim=(0, 2)).flatten()  # per (head, channel) max |K|: [H_kv * D]
    vc = cap["v"].abs().amax(dim=(0, 2)).flatten()
    k_ratio = (kc.max() / kc.median()).item()
    v_ratio = (vc.max() / vc.median()).item()
    assert k_ratio > 3 and k_ratio > 1.5 * v_ratio, (k_ratio, v_ratio)


# ---------------------------------------------------------------- capture
def test_capture_kv_equal_dynamic_cache(tiny_llama):
    model, _ = tiny_llama
    x = ids()
    cap = capture_qkv(model, x)
    with torch.no_grad():
        out = model(x, use_cache=True)
    cache = out.get("cache", None)
    cache = out.past_key_values if cache is None else cache
    assert sorted(cap) == [0, 1]
    for i, d in cap.items():
        assert d["q"].shape == (2, 4, 24, 64) and d["k"].shape == d["v"].shape == (2, 2, 24, 64)
        torch.testing.assert_close(d["k"], cache.layers[i].keys, rtol=0, atol=1e-6)
        torch.testing.assert_close(d["v"], cache.layers[i].values, rtol=0, atol=1e-6)
    assert list(capture_qkv(model, x, layers=[1])) == [1]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gemma3"])
def test_capture_q_reproduces_eager_attention_weights(name):
    model, _ = load_model(name, attn_implementation="eager")
    x = ids(T=20)
    cap = capture_qkv(model, x)
    with torch.no_grad():
        attns = model(x, output_attentions=True).attentions
    mods = attention_modules(model)
    T = x.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i, d in cap.items():
        q, k = d["q"], d["k"]
        G = q.shape[1] // k.shape[1]
        s = q @ k.repeat_interleave(G, dim=1).transpose(-1, -2) * mods[i].scaling  # [B, H_q, T, T]
        p = torch.softmax(s.masked_fill(~causal, -math.inf), dim=-1)
        torch.testing.assert_close(p, attns[i], rtol=1e-4, atol=1e-5)


def test_capture_bad_input(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match=r"\[7\]"):
        capture_qkv(model, ids(), layers=[7])
    with pytest.raises(ValueError, match="input_ids"):
        capture_qkv(model, torch.randn(2, 5))
