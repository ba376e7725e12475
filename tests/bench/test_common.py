"""CPU tests of the benchmarks' shared machinery (:mod:`mustafar.bench.common`): the timers, the
results-file writer with provenance, the cache factory and the random-K/V cache fill."""

from __future__ import annotations

import json

import pytest
import torch

from mustafar import MustafarCache, MustafarConfig, cache_kwargs
from mustafar.bench import common
from mustafar.bench.common import cache_nbytes, fill_cache, make_cache
from mustafar.bench.e2e_plan import kv_bytes, kv_geometry

# hand-checkable geometry of tiny-llama: 2 layers, 2 KV heads, head_dim 64, fp32, MustafarConfig's default window
GEO = {"layers": 2, "kv_heads": 2, "head_dim": 64, "itemsize": 4, "local_window": 32, "compress_chunk": 256}
DENSE_PER_TOKEN = 2 * 2 * 2 * 64 * 4  # K and V x layers x heads x D x fp32 = 2048 bytes per token per sequence


@pytest.fixture(scope="module")
def tiny_llama():
    """Own copy of the tiny model: MustafarCache and the dense caches switch its attention
    implementation ("mustafar" / "sdpa"), so the session's shared fixture is left alone."""
    from mustafar.models import load_model

    return load_model("tiny-llama")


class _Clock:
    """A fake ``perf_counter``: each call of the timed function advances it by the next scripted duration."""

    def __init__(self, durations_s):
        self.t, self.durations = 100.0, list(durations_s)
        self.calls = 0

    def now(self):
        return self.t

    def work(self):
        self.t += self.durations[self.calls]
        self.calls += 1


# --------------------------------------------------------------------------------------------- timing
def test_time_ms_is_the_median_of_the_timed_reps(monkeypatch):
    """Warm-up calls run but are not timed; the result is the median of exactly `reps` timed calls."""
    # 2 warm-up calls (huge, must be ignored), then 5 timed: 3, 1, 4, 1, 5 ms -> median 3 ms
    clock = _Clock([9.0, 9.0, 0.003, 0.001, 0.004, 0.001, 0.005])
    monkeypatch.setattr(common, "_now", clock.now)
    assert common.time_ms(clock.work, reps=5, warmup=2) == pytest.approx(3.0)
    assert clock.calls == 7
    clock = _Clock([0.002, 0.001, 0.004, 0.003])  # even count: mean of the middle two = 2.5 ms
    monkeypatch.setattr(common, "_now", clock.now)
    assert common.time_all_ms(clock.work, reps=4, warmup=0) == pytest.approx([2.0, 1.0, 4.0, 3.0])
    clock.calls = 0
    assert common.time_ms(clock.work, reps=4, warmup=0) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="reps"):
        common.time_ms(clock.work, reps=0)


def test_time_ms_real_clock_and_timed_call():
    x = torch.randn(64, 64)
    assert common.time_ms(lambda: x @ x, reps=3, warmup=1, device="cpu") > 0
    out, sec = common.timed_call(lambda: 7, "cpu")
    assert out == 7 and sec >= 0


def test_upper_median_and_affine_fit():
    assert common.upper_median([3.0, 1.0, 2.0, 10.0]) == 3.0 and common.upper_median([]) is None
    a, b = common.affine_fit([1, 2, 3], [5.0, 7.0, 9.0])  # y = 3 + 2x
    assert (a, b) == pytest.approx((3.0, 2.0))
    assert common.affine_fit([4, 4], [1.0, 3.0]) == (2.0, 0.0)
    with pytest.raises(ValueError):
        common.affine_fit([1, 2], [1.0])


# --------------------------------------------------------------------------------------------- results file
def test_write_results_records_provenance(tmp_path):
    out = tmp_path / "sub" / "r.json"
    res = {"rows": [{"x": 1}]}
    cmd = common.command_line("cpu", ["--quick", "--reps", 2])
    assert cmd == "python -m mustafar.bench cpu --quick --reps 2"
    assert common.write_results(out, res, cmd, backend="test") == out
    got = json.loads(out.read_text())
    prov = got["provenance"]
    assert got["rows"] == [{"x": 1}] and res["provenance"] == prov
    assert prov["command"] == cmd and prov["backend"] == "test"
    assert {"device", "torch", "transformers", "mustafar", "git", "date", "sm_count", "threads"} <= set(prov)
    assert prov["threads"] == torch.get_num_threads()
    assert not list(out.parent.glob("*.tmp"))  # written atomically
    # a provenance block collected earlier (a long run's checkpoints) is written as given
    common.write_results(out, {"rows": []}, prov={"command": "earlier"})
    assert json.loads(out.read_text())["provenance"] == {"command": "earlier"}


def test_default_out_is_under_results_dir():
    from mustafar.provenance import results_dir

    assert common.default_out("x.json") == results_dir() / "x.json"


# --------------------------------------------------------------------------------------------- cache factory
def test_make_cache_each_kind(tiny_llama):
    from transformers import DynamicCache, StaticCache

    model, _ = tiny_llama
    comp = make_cache("compressed", model, 0.5, 64)
    assert isinstance(comp, MustafarCache) and comp.config.mode == "compressed"
    assert comp.config.k_sparsity == comp.config.v_sparsity == 0.5
    sim = make_cache("simulate", model, 0.7)
    assert isinstance(sim, MustafarCache) and sim.config.mode == "simulate" and sim.config.v_sparsity == 0.7
    assert model.config._attn_implementation != "sdpa"  # a MustafarCache switched the model
    dyn = make_cache("dense", model)
    assert isinstance(dyn, DynamicCache) and model.config._attn_implementation == "sdpa"
    make_cache("compressed", model, 0.5)
    st = make_cache("static", model, max_len=48)
    assert isinstance(st, StaticCache) and model.config._attn_implementation == "sdpa_packed_gqa"  # GQA baseline
    assert set(common.CACHE_KINDS) == {"dense", "static", "compressed", "compressed-fp8", "simulate"}
    with pytest.raises(ValueError, match="kind"):
        make_cache("sparse", model)
    with pytest.raises(ValueError, match="max_len"):
        make_cache("static", model)


# --------------------------------------------------------------------------------------------- random fill
def _decode_step(model, cache, batch, pos):
    ids = torch.zeros(batch, 1, dtype=torch.long)
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache),
                     position_ids=torch.full((batch, 1), pos, dtype=torch.long)).logits


@pytest.mark.parametrize("s", [0.5, 0.7])
def test_fill_cache_mustafar_matches_prefill(tiny_llama, s):
    """A MustafarCache filled with random K/V holds what a real prefill of the same length leaves:
    same length, compressed/window split and bytes (== kv_bytes); a decode step then gives finite
    logits and compresses nothing; extending a filled cache equals filling it at once."""
    model, _ = tiny_llama
    b, n, max_len = 2, 300, 320
    cfg = MustafarConfig(k_sparsity=s, v_sparsity=s)
    real, fake, ext = (MustafarCache(model, cfg, max_cache_len=max_len) for _ in range(3))
    common.prefill(model, real, b, n, seed=0)  # a real prefill of random ids
    fill_cache(model, fake, b, n, seed=3)
    fill_cache(model, ext, b, 200, seed=3)
    fill_cache(model, ext, b, n, seed=4)
    for c in (fake, ext):
        assert c.get_seq_length() == real.get_seq_length() == n
        br, bf = real.breakdown(), c.breakdown()
        assert (bf["compressed_tokens"], bf["window_tokens"]) == (br["compressed_tokens"], br["window_tokens"]) \
            == (n - 32, 32)
        assert c.nbytes() == real.nbytes()
    geo = kv_geometry(model, torch.float32)
    assert geo == GEO
    assert kv_bytes("compressed", s, geo, b, max_len) == fake.nbytes()
    logits = _decode_step(model, fake, b, n)
    assert logits.shape == (b, 1, model.config.vocab_size) and torch.isfinite(logits).all()
    assert fake.get_seq_length() == n + 1 and fake.breakdown()["compressed_tokens"] == n - 32


def test_fill_cache_dense_and_static(tiny_llama):
    """DynamicCache: one update per layer, the dense byte count; StaticCache: written in chunks at the
    right positions (the slots after `length` stay empty); decode steps after both are finite."""
    from transformers import DynamicCache, StaticCache

    model, _ = tiny_llama
    b, n = 2, 150
    dyn = make_cache("dense", model, 0.0, n + 8)
    assert isinstance(dyn, DynamicCache)
    fill_cache(model, dyn, b, n)
    assert dyn.get_seq_length() == n
    assert cache_nbytes(dyn) == kv_bytes("dense", 0.0, GEO, b, n) == b * n * DENSE_PER_TOKEN
    st = make_cache("static", model, 0.0, n + 8)
    assert isinstance(st, StaticCache) and model.config._attn_implementation == "sdpa_packed_gqa"  # GQA baseline
    fill_cache(model, st, b, n, chunk=64)  # 64 + 64 + 22 tokens per layer
    assert int(st.get_seq_length()) == n
    keys = st.layers[1].keys
    assert (keys[:, :, :n].abs().sum(-1) > 0).all() and (keys[:, :, n:] == 0).all()
    for c in (dyn, st):
        logits = _decode_step(model, c, b, n)
        assert torch.isfinite(logits).all()
        assert int(c.get_seq_length()) == n + 1


def test_fill_cache_tail_and_errors(tiny_llama):
    """`tail` tokens go in one per update (a MustafarCache keeps them in its window); asking for fewer
    tokens than the cache holds, or a tail longer than the new tokens, raises."""
    model, _ = tiny_llama
    c = MustafarCache(model, MustafarConfig(), max_cache_len=400)
    fill_cache(model, c, 1, 300, tail=200)
    assert c.breakdown()["window_tokens"] == 32 + 200 and c.get_seq_length() == 300
    assert not e2e_pending(c)
    # no decode mark is left behind for an attention call that never came: a 2-token forward (the
    # cache's chunked-prompt path) after the fill runs
    with torch.inference_mode():
        logits = model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True, **cache_kwargs(model, c),
                       position_ids=torch.tensor([[300, 301]])).logits
    assert torch.isfinite(logits).all() and c.get_seq_length() == 302
    with pytest.raises(ValueError, match="already holds"):
        fill_cache(model, c, 1, 100)
    with pytest.raises(ValueError, match="tail"):
        fill_cache(model, c, 1, 310, tail=11)


def e2e_pending(cache=None):
    """Notes a MustafarCache left for attention calls that never came (none after a fill)."""
    return {} if cache is None else dict(cache.handoff._slots)


def test_gpu_result_names_carry_the_card():
    from mustafar.bench.common import slug_of_device_name

    assert slug_of_device_name("NVIDIA H100 80GB HBM3") == "h100"
    assert slug_of_device_name("NVIDIA H200") == "h200"
    assert slug_of_device_name("NVIDIA A100-SXM4-80GB") == "a100"
    assert slug_of_device_name("NVIDIA GeForce RTX 4090") == "nvidia_geforce_rtx_4090"
