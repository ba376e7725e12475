"""append_decode (one in-place decode step of a preallocated layer) + sparse_decode(lengths=) over many steps.

From a prefilled state (store rows ``[0, n_c)`` encoded by ``prune_encode_topk``, the ring holding the
window, every unused store row and ring slot poisoned with NaN / all-ones bitmaps), 300+ decode steps with
fresh random K/V. After every step:

* the C++ op and the reference leave bit-identical states (window, store, scales, lengths);
* ``lengths`` follows the chunked schedule (window of ``L``, ``chunk`` tokens made visible at once);
* the store row written in the step equals ``prune_encode_topk`` of that token (bit-exact bitmap,
  exact values; FP8 sides exactly ``quantize_fp8`` of those values);
* ``sparse_decode(..., lengths=lengths)`` (C++) equals attention computed from scratch in float64 over the
  same tokens (compressed ones pruned + quantized as the schedule says, window dense).

Tolerances of the attention check (as in tests/test_ops_cpu.py): float32 atol = rtol = 1e-5; float16 /
bfloat16 atol = rtol = 1e-2 (the output is rounded to the input dtype).
"""

from __future__ import annotations

import math

import pytest
import torch

from mustafar.cache import MustafarConfig, MustafarLayer
from mustafar.format import quantize_fp8
from mustafar.ops import dispatch as ops
from mustafar.ops import reference as ref

FP8 = torch.float8_e4m3fn
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
_INT_VIEW = {FP8: torch.uint8, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
             torch.int64: torch.int64, torch.int32: torch.int32}
NAMES = ("k_window", "v_window", "k_bitmap", "k_values", "v_bitmap", "v_values", "k_scale", "v_scale", "lengths")


@pytest.fixture(autouse=True)
def _compiled():
    ops.set_backend_mode("compiled")
    assert ops.backend("cpu") == "cpu"
    yield
    ops.set_backend_mode(None)


def _round8(n):
    return -(-n // 8) * 8


def _bits(t):
    """Bit pattern of ``t`` (NaN-safe exact comparison)."""
    return t.contiguous().view(_INT_VIEW[t.dtype])


class Layer:
    """The tensors of one preallocated layer, in ``append_decode``'s argument order."""

    def __init__(self, b, h, d, r, cap, kk, kv, dtype, fp8_k, fp8_v):
        nan = float("nan")
        self.k_window = torch.full((b, h, r, d), nan, dtype=dtype)  # poisoned: a read of a free slot shows
        self.v_window = torch.full((b, h, r, d), nan, dtype=dtype)
        self.k_bitmap = torch.full((b, h, cap, d // 64), -1, dtype=torch.int64)
        self.v_bitmap = torch.full((b, h, cap, d // 64), -1, dtype=torch.int64)
        self.k_values = torch.full((b, h, cap, kk), nan, dtype=FP8 if fp8_k else dtype)
        self.v_values = torch.full((b, h, cap, kv), nan, dtype=FP8 if fp8_v else dtype)
        self.k_scale = torch.full((b, h, cap), nan, dtype=torch.float16) if fp8_k else None
        self.v_scale = torch.full((b, h, cap), nan, dtype=torch.float16) if fp8_v else None
        self.lengths = torch.zeros(2, dtype=torch.int32)

    def args(self):
        return [getattr(self, n) for n in NAMES]

    def clone(self):
        other = object.__new__(Layer)
        for n in NAMES:
            t = getattr(self, n)
            setattr(other, n, None if t is None else t.clone())
        return other

    def assert_equal(self, other, what):
        for n in NAMES:
            a, b = getattr(self, n), getattr(other, n)
            assert (a is None) == (b is None), n
            if a is not None:
                assert torch.equal(_bits(a), _bits(b)), f"{what}: {n} differs"

    def decode(self, q, kv_start=None, scale=None):
        return ops.sparse_decode(q, self.k_bitmap, self.k_values, self.v_bitmap, self.v_values, self.k_window,
                                 self.v_window, kv_start, scale, k_scale=self.k_scale, v_scale=self.v_scale,
                                 lengths=self.lengths)


def _encoded(x, k, fp8):
    """What the store row of token vectors ``x [B, H, D]`` must hold, and their dense value in float64
    (pruned, and quantized on an FP8 side), computed from the rules."""
    bitmap, values = ref.prune_encode_topk(x, k)
    mask = ref.topk_mask(x, k)
    kept = x[mask].reshape(*x.shape[:-1], k)  # ascending channel order, like the format
    dense = torch.zeros(x.shape, dtype=torch.float64)
    if fp8:
        q8, s = quantize_fp8(values)
        dense[mask] = (q8.double() * s.double()[..., None]).flatten()
        return bitmap, q8, s, dense
    dense[mask] = kept.double().flatten()
    return bitmap, values, None, dense


def _attend(q, keys, vals, kv_start, scale):
    """float64 attention of ``q [B, H_q, D]`` over ``keys/vals [B, H, T, D]``; all-masked rows give 0."""
    b, h_q, d = q.shape
    h = keys.shape[1]
    qg = q.double().reshape(b, h, h_q // h, d)
    s = torch.einsum("bhgd,bhtd->bhgt", qg, keys) * scale
    valid = torch.ones(b, keys.shape[2], dtype=torch.bool)
    if kv_start is not None:
        valid = torch.arange(keys.shape[2])[None] >= kv_start.long()[:, None]
    s = s.masked_fill(~valid[:, None, None], -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # all -inf -> NaN -> 0
    return torch.einsum("bhgt,bhtd->bhgd", p, vals).reshape(b, h_q, d)


class Run:
    """A layer driven through ``append_decode`` with its from-scratch expectations."""

    def __init__(self, *, L, chunk, r, d, kk, kv, dtype, fp8_k, fp8_v, prefill, steps, b=2, h=2, seed=0):
        self.L, self.chunk, self.dtype, self.kk, self.kv = L, chunk, dtype, kk, kv
        self.fp8 = (fp8_k, fp8_v)
        self.gen = torch.Generator().manual_seed(seed)
        cap = _round8(prefill + steps)
        self.layer = Layer(b, h, d, r, cap, kk, kv, dtype, fp8_k, fp8_v)
        n = prefill + steps
        self.keys = torch.zeros(b, h, n, d, dtype=torch.float64)  # dense tokens
        self.vals = torch.zeros_like(self.keys)
        self.keys_c = torch.zeros_like(self.keys)  # the same tokens as stored when compressed
        self.vals_c = torch.zeros_like(self.keys)
        self.rows = {}  # position -> expected (k rows, v rows)
        self.n = 0
        x_k, x_v = self._tokens(prefill)
        n_c = max(0, prefill - L)
        lay = self.layer
        for p in range(prefill):
            self._add(x_k[:, :, p], x_v[:, :, p])
        for p in range(prefill):
            if p < n_c:
                (kb, kvv, ks, _), (vb, vvv, vs, _) = self.rows[p]
                lay.k_bitmap[:, :, p], lay.k_values[:, :, p], lay.v_bitmap[:, :, p], lay.v_values[:, :, p] = kb, kvv, vb, vvv
                if ks is not None:
                    lay.k_scale[:, :, p] = ks
                if vs is not None:
                    lay.v_scale[:, :, p] = vs
            else:
                lay.k_window[:, :, p % r] = x_k[:, :, p]
                lay.v_window[:, :, p % r] = x_v[:, :, p]
        lay.lengths.copy_(torch.tensor([n_c, prefill - n_c], dtype=torch.int32))
        self.n_c, self.n_w = n_c, prefill - n_c

    def _tokens(self, t):
        b, h, _, d = self.keys.shape
        x = torch.randn(2, b, h, t, d, generator=self.gen).to(self.dtype)
        assert not (x == 0).any()
        return x[0], x[1]

    def _add(self, xk, xv):
        p = self.n
        ek, ev = _encoded(xk, self.kk, self.fp8[0]), _encoded(xv, self.kv, self.fp8[1])
        self.rows[p] = (ek, ev)
        self.keys[:, :, p], self.vals[:, :, p] = xk.double(), xv.double()
        self.keys_c[:, :, p], self.vals_c[:, :, p] = ek[3], ev[3]
        self.n += 1

    def step(self, other: Layer | None = None):
        """One decode step on the C++ layer (and ``other`` through the reference), with the checks."""
        lay = self.layer
        n_old, n_c_old = self.n, self.n_c
        xk, xv = self._tokens(1)
        self._add(xk[:, :, 0], xv[:, :, 0])
        ops.append_decode(xk, xv, *lay.args(), self.L, self.chunk)
        if other is not None:
            ref.append_decode(xk, xv, *other.args(), self.L, self.chunk)
            lay.assert_equal(other, f"step at n={n_old}")
        self.n_w += 1
        if self.n_w > self.L + self.chunk:
            self.n_c, self.n_w = self.n_c + self.chunk, self.n_w - self.chunk
        assert lay.lengths.tolist() == [self.n_c, self.n_w]
        assert self.n_c + self.n_w == self.n
        e = n_old - self.L
        if e >= 0 and e >= n_c_old:  # the row written in this step
            self.check_row(e)

    def check_row(self, p):
        lay = self.layer
        for (bm, vals, sc, _), (bitmap, values, scale) in zip(
                self.rows[p], ((lay.k_bitmap, lay.k_values, lay.k_scale), (lay.v_bitmap, lay.v_values, lay.v_scale))):
            assert torch.equal(bitmap[:, :, p], bm), p
            assert torch.equal(_bits(values[:, :, p]), _bits(vals)), p
            if sc is not None:
                assert torch.equal(_bits(scale[:, :, p]), _bits(sc)), p

    def check_attention(self, g, kv_start=None, through_reference=False):
        b, h, _, d = self.keys.shape
        q = torch.randn(b, h * g, d, generator=self.gen).to(self.dtype)
        n_c, n = self.n_c, self.n
        keys = torch.cat([self.keys_c[:, :, :n_c], self.keys[:, :, n_c:n]], dim=2)
        vals = torch.cat([self.vals_c[:, :, :n_c], self.vals[:, :, n_c:n]], dim=2)
        want = _attend(q, keys, vals, kv_start, 1 / math.sqrt(d))
        lay = self.layer
        got = lay.decode(q, kv_start)
        assert got.dtype == self.dtype
        tol = TOL[self.dtype]
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
        if through_reference:
            r = ref.sparse_decode(q, lay.k_bitmap, lay.k_values, lay.v_bitmap, lay.v_values, lay.k_window,
                                  lay.v_window, kv_start, k_scale=lay.k_scale, v_scale=lay.v_scale, lengths=lay.lengths)
            torch.testing.assert_close(r.double(), want, atol=tol, rtol=tol)


# (L, chunk, R, D, k_k, k_v, dtype, fp8 sides, prefill tokens, G)
CASES = [
    (4, 3, 8, 64, 19, 25, torch.float32, "", 0, 3),
    (32, 16, 49, 128, 38, 38, torch.float16, "k", 100, 4),
    (7, 5, 20, 128, 38, 40, torch.bfloat16, "v", 3, 1),
    (0, 1, 2, 64, 1, 64, torch.float32, "kv", 5, 7),
    (16, 32, 49, 64, 20, 30, torch.float16, "kv", 111, 8),
    (5, 1, 9, 128, 38, 51, torch.float32, "kv", 200, 3),
    (1, 7, 13, 64, 13, 19, torch.bfloat16, "", 1, 4),
    (3, 4, 8, 128, 64, 38, torch.float16, "k", 2, 1),
]
STEPS = 320


@pytest.mark.parametrize("L,chunk,r,d,kk,kv,dtype,fp8,prefill,g", CASES)
def test_append_then_decode_over_many_steps(L, chunk, r, d, kk, kv, dtype, fp8, prefill, g):
    run = Run(L=L, chunk=chunk, r=r, d=d, kk=kk, kv=kv, dtype=dtype, fp8_k="k" in fp8, fp8_v="v" in fp8,
              prefill=prefill, steps=STEPS, seed=L * 1000 + chunk * 10 + d)
    other = run.layer.clone()
    run.check_attention(g)
    for i in range(STEPS):
        run.step(other)
        kv_start = None
        if i % 3 == 1:  # left padding, some rows fully masked
            kv_start = torch.randint(0, run.n + 2, (2,), generator=run.gen, dtype=torch.int32)
            kv_start[i % 2] = run.n + (i % 5)  # >= n: every position masked -> zeros
        run.check_attention(g, kv_start, through_reference=i % 37 == 0)
        if kv_start is not None:
            assert torch.equal(run.layer.decode(torch.ones(2, 2 * g, d, dtype=dtype), kv_start)[i % 2],
                               torch.zeros(2 * g, d, dtype=dtype))
    for p in range(run.n - L):  # every encoded row, including those not yet visible
        run.check_row(p)


@pytest.mark.parametrize("L,chunk,prefill", [(4, 3, 0), (6, 5, 23), (0, 2, 9), (32, 16, 70)])
def test_schedule_matches_eager_layer(L, chunk, prefill):
    """The visible state after every step equals the eager MustafarLayer's (same n_c / n_w, bit-identical
    store rows and window): append_decode reproduces its chunked schedule."""
    d, dtype = 64, torch.float16
    cfg = MustafarConfig(k_sparsity=0.7, v_sparsity=0.5, local_window=L, compress_chunk=chunk)
    run = Run(L=L, chunk=chunk, r=L + chunk + 1, d=d, kk=cfg.kept("k", d), kv=cfg.kept("v", d), dtype=dtype,
              fp8_k=False, fp8_v=False, prefill=prefill, steps=150, seed=prefill)
    eager = MustafarLayer(cfg, 2, d, dtype)
    if prefill:
        eager.update(run.keys[:, :, :prefill].to(dtype), run.vals[:, :, :prefill].to(dtype))
    lay, r = run.layer, run.layer.k_window.shape[2]
    for _ in range(150):
        run.step()
        eager.update(run.keys[:, :, run.n - 1:run.n].to(dtype), run.vals[:, :, run.n - 1:run.n].to(dtype))
        n_c, n_w = lay.lengths.tolist()
        assert (eager.n_c, eager.n_w) == (n_c, n_w)
        assert torch.equal(eager.k_bitmap[:, :, :n_c], lay.k_bitmap[:, :, :n_c])
        assert torch.equal(eager.k_vals[:, :, :n_c], lay.k_values[:, :, :n_c])
        assert torch.equal(eager.v_bitmap[:, :, :n_c], lay.v_bitmap[:, :, :n_c])
        assert torch.equal(eager.v_vals[:, :, :n_c], lay.v_values[:, :, :n_c])
        slots = (n_c + torch.arange(n_w)) % r
        assert torch.equal(eager.k_win[:, :, :n_w], lay.k_window[:, :, slots])
        assert torch.equal(eager.v_win[:, :, :n_w], lay.v_window[:, :, slots])


@pytest.mark.parametrize("fp8", ["", "k", "kv"])
def test_torch_compile_fullgraph_append_then_decode(fp8):
    """append_decode then sparse_decode(lengths=) traced with torch.compile(fullgraph=True) give eager's
    results and states, step after step (lengths changes value, not shape: no recompile needed)."""
    torch._dynamo.reset()
    L, chunk, d, g = 3, 2, 64, 2

    def step(k, v, q, kw, vw, kb, kv, vb, vv, ks, vs, lengths):
        ops.append_decode(k, v, kw, vw, kb, kv, vb, vv, ks, vs, lengths, L, chunk)
        out = ops.sparse_decode(q, kb, kv, vb, vv, kw, vw, k_scale=ks, v_scale=vs, lengths=lengths)
        return out * 2

    run = Run(L=L, chunk=chunk, r=L + chunk + 1, d=d, kk=19, kv=25, dtype=torch.float32, fp8_k="k" in fp8,
              fp8_v="v" in fp8, prefill=4, steps=20, seed=5)
    eager_layer = run.layer
    compiled_layer = eager_layer.clone()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(6)
    for _ in range(20):
        k, v = torch.randn(2, 2, 2, 1, d, generator=gen)
        q = torch.randn(2, 2 * g, d, generator=gen)
        want = step(k, v, q, *eager_layer.args())
        got = compiled(k, v, q, *compiled_layer.args())
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        compiled_layer.assert_equal(eager_layer, "compiled vs eager")


@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_append_decode_bad_inputs_raise_value_error(backend):
    ops.set_backend_mode(backend)
    lay = Layer(2, 2, 64, 8, 16, 19, 25, torch.float16, True, False)
    k = torch.randn(2, 2, 1, 64).half()

    def call(**over):
        a = dict(zip(("k", "v") + NAMES, [k, k.clone()] + lay.args()))
        a.update(local_window=4, chunk=3)
        a.update(over)
        return ops.append_decode(**a)

    cases = [
        (dict(local_window=5), "R=8"),
        (dict(chunk=0), "chunk=0"),
        (dict(local_window=-1), "local_window=-1"),
        (dict(k=k.float()), "k.dtype"),
        (dict(v=torch.randn(2, 2, 2, 64).half()), "v shape"),
        (dict(k_window=lay.k_window[..., :32]), "D=32"),
        (dict(v_window=lay.v_window[:, :, :7]), "v_window shape"),
        (dict(k_bitmap=lay.k_bitmap.int()), "k_bitmap.dtype"),
        (dict(v_bitmap=lay.v_bitmap[:, :, :8]), "v_bitmap shape"),
        (dict(v_values=lay.v_values.float()), "v_values.dtype"),
        (dict(k_values=lay.k_values[:, :, :8]), "k_values shape"),
        (dict(k_scale=None), "k_scale"),
        (dict(v_scale=lay.k_scale), "v_scale given"),
        (dict(k_scale=lay.k_scale.float()), "k_scale.dtype"),
        (dict(lengths=lay.lengths.long()), "lengths"),
        (dict(lengths=torch.tensor([0, 8], dtype=torch.int32)), "n_w=8"),
        (dict(lengths=torch.tensor([17, 0], dtype=torch.int32)), "n_c=17"),
        (dict(lengths=torch.zeros(3, dtype=torch.int32)), "lengths"),
    ]
    for over, match in cases:
        with pytest.raises(ValueError, match=match):
            call(**over)
    call(lengths=torch.tensor([12, 7], dtype=torch.int32))  # e = 12 + 7 - 4 = 15 < 16: fine
    with pytest.raises(ValueError, match="capacity C=16"):
        call(lengths=torch.tensor([13, 7], dtype=torch.int32))  # e = 16


def test_append_decode_cpp_checks_directly():
    lay = Layer(1, 1, 64, 8, 8, 19, 25, torch.float32, False, False)
    k = torch.randn(1, 1, 1, 64)
    with pytest.raises(ValueError, match="R=8"):
        torch.ops.mustafar.append_decode(k, k, *lay.args(), 6, 2)
    with pytest.raises(ValueError, match="capacity C=8"):
        lay.lengths.copy_(torch.tensor([8, 4], dtype=torch.int32))  # e = 12 - 4 = 8
        torch.ops.mustafar.append_decode(k, k, *lay.args(), 4, 3)
