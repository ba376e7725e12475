"""The one dispatch point from Python to the compiled ``mustafar`` ops.

Each function validates its inputs (``ValueError`` naming the bad value) and then runs

* the CUDA kernel for CUDA tensors when the extension was built with CUDA kernels,
* the C++ kernel (``torch.ops.mustafar.*``, CPU) for CPU tensors,
* otherwise :mod:`mustafar.ops.reference` (plain torch).

The extension is built/loaded lazily on first use (see :mod:`mustafar.ops.build`). If that fails a
warning is issued once and the reference is used.

Backend mode (a debugging aid): ``auto`` (default), ``reference`` (always the plain-torch reference) or
``compiled`` (a build failure, or a device without compiled kernels, is an error). It is read once, at
the first op call, from the environment variable ``MUSTAFAR_BACKEND``; :func:`set_backend_mode`
overrides it in-process (tests use it).

Kernel choice: on CUDA, ``sparse_decode`` has several fused decode kernels, chosen by its ``kernel``
argument (nothing is read from the environment per call): ``"auto"`` (default; for fp16/bf16: v6 wherever it
serves the call (up to 8 query heads per KV head, at most 64 stored values per row, head_dim 64 / 128, 16-bit values
or e4m3 on both sides, host or device-side ``lengths``), as ``"v6k"`` for 5-8 query heads per KV head with 16-bit
values, except v5 for MHA at head_dim 64 with at most 25 stored
values per row (16-bit, host lengths); v7 for the rest of FP8 values, ``lengths``, head_dim 256 and odd G; v5 for
other GQA with k > 64; v4 for float32 and MHA with k > 64: the rule ``csrc/cuda/plan.h`` states with the H100
timings behind it), ``"v7"`` (k compiled in where instantiated), ``"v7g"`` (v7 with k read at run time), ``"v4"``,
``"v5"``, ``"v6"``, ``"v6g"`` (v6 with k read at run time instead of its instantiations for k = 38 and 64 at
head_dim 128) or ``"v6k"`` (v6 with the K dot products on tensor cores: each stored K value is scattered into the
warp's dense tile, K rows walked before V rows, and S = K q^T runs as mma, so the per-value work does not grow with G;
16-bit values, k at run time); see ``docs/kernel_notes.md``. A
kernel that cannot serve the call's dtype or shape raises ``ValueError`` naming it. ``pdl`` launches the
merge kernel as a programmatic dependent of the decode kernel (Hopper; ``pdl=False`` launches it after
the decode kernel). CPU tensors take ``kernel="auto"`` only; the reference ignores both.

Cache layout v2 (docs/design.md, "Compiled ops"): ``sparse_decode`` reads FP8 (e4m3) stored values with a
float16 scale per token vector (``k_scale`` / ``v_scale``) and, given ``lengths = (n_c, n_w)``, only the
first ``n_c`` store rows and a ring window; ``append_decode`` is the in-place decode step that fills that
layout. ``lengths`` is never read on the host here (the CPU kernel and the reference read it).

torch.compile: every op has a fake (meta) implementation, registered when the extension loads, so
``torch.compile(fullgraph=True)`` traces both ``torch.ops.mustafar.*`` and these wrappers (their checks
run at trace time).
"""

from __future__ import annotations

import math
import os
import threading
import warnings

import torch

from mustafar.ops import reference
from mustafar.ops.reference import check_head_dim

__all__ = ["encode_bitmap", "decode_bitmap", "prune_encode_topk", "sparse_decode", "append_decode", "backend",
           "set_backend_mode", "DECODE_KERNELS"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FP8 = reference.FP8
_OPS = ("encode_bitmap", "decode_bitmap", "prune_encode_topk", "sparse_decode", "append_decode")
_MODES = ("auto", "reference", "compiled")
#: the values of ``sparse_decode``'s ``kernel`` argument
DECODE_KERNELS = ("auto", "v7", "v7g", "v4", "v5", "v6", "v6g", "v6k")
_lock = threading.Lock()
_state: dict = {"tried": False, "ok": False, "error": None, "warned": False, "cuda": False}
_mode_value: str | None = None  # None: read MUSTAFAR_BACKEND at the next use


def set_backend_mode(mode: str | None) -> None:
    """Set the backend mode (``"auto"``, ``"reference"`` or ``"compiled"``) for this process;
    ``None`` re-reads ``MUSTAFAR_BACKEND`` at the next op call."""
    global _mode_value
    if mode is not None:
        mode = _check_mode(mode, "mode")
    _mode_value = mode


def _check_mode(mode, what: str) -> str:
    m = str(mode).strip().lower() or "auto"
    if m not in _MODES:
        raise ValueError(f"{what}={mode!r}: expected 'auto', 'reference' or 'compiled'")
    return m


def _mode() -> str:
    global _mode_value
    if _mode_value is None:
        _mode_value = _check_mode(os.environ.get("MUSTAFAR_BACKEND", "auto"), "MUSTAFAR_BACKEND")
    return _mode_value


# ------------------------------------------------------------------------------- fake kernels
# Shape-only implementations for torch.compile / FakeTensor: the same output shapes, dtypes and devices
# as the real ops (outputs are contiguous).
def _fake_encode(x, mask, k):
    return (x.new_empty((*x.shape[:-1], x.shape[-1] // 64), dtype=torch.int64),
            x.new_empty((*x.shape[:-1], k)))


def _fake_decode(bitmap, values, head_dim):
    return values.new_empty((*values.shape[:-1], head_dim))


def _fake_topk(x, k):
    return _fake_encode(x, None, k)


def _fake_sparse_decode(q, k_bitmap, k_values, v_bitmap, v_values, k_window, v_window, kv_start, scale,
                        k_scale=None, v_scale=None, lengths=None, variant="auto", pdl=True):
    return q.new_empty(q.shape)  # [B, H_q, D] in q.dtype


def _fake_append_decode(k, v, k_window, v_window, k_bitmap, k_values, v_bitmap, v_values, k_scale, v_scale,
                        lengths, local_window, chunk):
    return None  # mutates the window, store, scales and lengths in place


_FAKES = {"encode_bitmap": _fake_encode, "decode_bitmap": _fake_decode,
          "prune_encode_topk": _fake_topk, "sparse_decode": _fake_sparse_decode,
          "append_decode": _fake_append_decode}


def _register_fakes() -> None:
    for name, fn in _FAKES.items():
        try:
            torch.library.register_fake("mustafar::" + name)(fn)
        except RuntimeError as exc:  # already registered (module reloaded)
            if "already" not in str(exc).lower():
                raise


def _load() -> bool:
    """Build/load the extension once (and register the fake kernels). Returns whether
    ``torch.ops.mustafar`` is usable."""
    if _state["tried"]:
        return _state["ok"]
    with _lock:
        if _state["tried"]:
            return _state["ok"]
        try:
            from mustafar.ops.build import load_extension

            load_extension()
            for name in _OPS:
                getattr(torch.ops.mustafar, name)
            _register_fakes()
            _state["cuda"] = _has_cuda_kernels()
            _state["ok"] = True
        except Exception as exc:  # noqa: BLE001 - any build/load failure falls back
            _state["error"] = exc
            _state["ok"] = False
        _state["tried"] = True
    return _state["ok"]


def _has_cuda_kernels() -> bool:
    try:
        return all(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"mustafar::{n}", "CUDA") for n in _OPS
        )
    except Exception:  # noqa: BLE001
        return False


def backend(device: torch.device | str | None = None) -> str:
    """Which implementation runs for tensors on ``device`` (default CPU).

    Returns
    -------
    ``"cuda"`` (compiled CUDA kernels), ``"cpu"`` (compiled C++ kernels) or ``"reference"``.
    """
    dev = torch.device("cpu" if device is None else device)
    mode = _mode()
    if mode == "reference":
        return "reference"
    ok = _load()
    if not ok:
        if mode == "compiled":
            raise RuntimeError(
                f"MUSTAFAR_BACKEND=compiled but the extension failed to build/load: {_state['error']!r}"
            )
        if not _state["warned"]:
            _state["warned"] = True
            warnings.warn(
                f"mustafar: compiled extension unavailable ({_state['error']!r}); "
                "using the plain-torch reference (slow)",
                RuntimeWarning,
                stacklevel=3,
            )
        return "reference"
    if dev.type == "cpu":
        return "cpu"
    if dev.type == "cuda" and _state["cuda"]:
        return "cuda"
    if mode == "compiled":
        raise RuntimeError(f"MUSTAFAR_BACKEND=compiled but no compiled kernels for device {dev}")
    return "reference"


# ----------------------------------------------------------------------------------- validation
def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"{name}.dtype={t.dtype} not supported: expected float16, bfloat16 or float32")


def _check_k(k, d: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        try:
            k_int = int(k)
        except (TypeError, ValueError):
            raise ValueError(f"k={k!r} must be an int") from None
        if k_int != k:
            raise ValueError(f"k={k!r} must be an int")
        k = k_int
    if not 0 <= k <= d:
        raise ValueError(f"k={k} out of range [0, {d}] for head_dim {d}")
    return k


def _check_bitmap(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise ValueError(f"{name}.dtype={t.dtype}: bitmaps are int64")


def _check_values(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple, d: int) -> bool:
    """Stored values ``[*shape, k]`` in ``dtype`` or float8_e4m3fn, ``k <= d``; returns whether FP8."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (dtype, _FP8):
        raise ValueError(f"{name}.dtype={t.dtype}: expected {dtype} (the dense dtype) or torch.float8_e4m3fn")
    if t.dim() != len(shape) + 1 or tuple(t.shape[:-1]) != tuple(shape) or t.shape[-1] > d:
        raise ValueError(f"{name} shape {tuple(t.shape)}: expected [{', '.join(map(str, shape))}, k] with k <= {d}")
    return t.dtype == _FP8


def _check_scale(name: str, t, values_name: str, fp8: bool, shape: tuple) -> None:
    """An FP8 side's float16 scale ``shape``; None for a side stored in the dense dtype."""
    if not fp8:
        if t is not None:
            raise ValueError(f"{name} given but {values_name} is not float8_e4m3fn: a scale belongs to FP8 values only")
        return
    if t is None:
        raise ValueError(f"{values_name} is float8_e4m3fn but {name} is None: FP8 values need their float16 scale")
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float16:
        raise ValueError(f"{name}.dtype={getattr(t, 'dtype', type(t).__name__)}: expected torch.float16")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} shape {tuple(t.shape)} != [{', '.join(map(str, shape))}]")


def _check_lengths(t) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or tuple(t.shape) != (2,):
        raise ValueError(f"lengths must be an int32 tensor [2] = (n_c, n_w), got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")


def _same_device(**tensors: torch.Tensor) -> torch.device:
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    first = next(iter(devs.values()))
    for n, d in devs.items():
        if d != first:
            raise ValueError(f"{n} is on {d} but other inputs are on {first}")
    return first


# ------------------------------------------------------------------------------------------ ops
def encode_bitmap(x: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack ``x[mask]`` into the bitmap format.

    Parameters
    ----------
    x : ``[..., T, D]`` float16/bfloat16/float32, ``D`` a multiple of 64.
    mask : bool ``[..., T, D]`` with at most ``k`` True per row.
    k : value slots per row, ``0 <= k <= D``.

    Returns
    -------
    bitmap : int64 ``[..., T, D // 64]``; values : ``[..., T, k]`` in ``x.dtype`` (padding 0).
    """
    _check_float("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dim, got shape {tuple(x.shape)}")
    check_head_dim(x.shape[-1])
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != x shape {tuple(x.shape)}")
    k = _check_k(k, x.shape[-1])
    dev = _same_device(x=x, mask=mask)
    if backend(dev) == "reference":
        return reference.encode_bitmap(x, mask, k)
    return torch.ops.mustafar.encode_bitmap(x, mask, k)


def decode_bitmap(bitmap: torch.Tensor, values: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Dense ``[..., T, head_dim]`` from ``bitmap [..., T, W]`` and ``values [..., T, k]``."""
    _check_bitmap("bitmap", bitmap)
    _check_float("values", values)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int):
        raise ValueError(f"head_dim={head_dim!r} must be an int")
    w = check_head_dim(head_dim)
    if bitmap.dim() < 1 or bitmap.shape[-1] != w:
        raise ValueError(f"bitmap shape {tuple(bitmap.shape)}: last dim must be head_dim/64 = {w}")
    if values.shape[:-1] != bitmap.shape[:-1]:
        raise ValueError(
            f"values shape {tuple(values.shape)} and bitmap shape {tuple(bitmap.shape)} differ "
            "in the leading dims"
        )
    if values.shape[-1] > head_dim:
        raise ValueError(f"values last dim k={values.shape[-1]} > head_dim={head_dim}")
    dev = _same_device(bitmap=bitmap, values=values)
    if backend(dev) == "reference":
        return reference.decode_bitmap(bitmap, values, head_dim)
    return torch.ops.mustafar.decode_bitmap(bitmap, values, head_dim)


def prune_encode_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``k`` largest ``|x|`` of every row (tie rule of design.md) and encode them."""
    _check_float("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dim, got shape {tuple(x.shape)}")
    check_head_dim(x.shape[-1])
    k = _check_k(k, x.shape[-1])
    if backend(x.device) == "reference":
        return reference.prune_encode_topk(x, k)
    return torch.ops.mustafar.prune_encode_topk(x, k)


def sparse_decode(
    q: torch.Tensor,
    k_bitmap: torch.Tensor,
    k_values: torch.Tensor,
    v_bitmap: torch.Tensor,
    v_values: torch.Tensor,
    k_window: torch.Tensor | None = None,
    v_window: torch.Tensor | None = None,
    kv_start: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    kernel: str = "auto",
    pdl: bool = True,
) -> torch.Tensor:
    """Decode attention of one query token over ``[compressed ; dense window]``.

    Parameters
    ----------
    q : ``[B, H_q, D]`` float16/bfloat16/float32.
    k_bitmap, v_bitmap : int64 ``[B, H_kv, T_c, D // 64]``.
    k_values : ``[B, H_kv, T_c, k_k]``; v_values : ``[B, H_kv, T_c, k_v]``: q's dtype or
        ``torch.float8_e4m3fn`` (each side on its own; stored value = ``q8.float() * scale.float()``).
    k_window, v_window : ``[B, H_kv, T_w, D]`` (q's dtype) or None for ``T_w = 0``.
    kv_start : optional int32/int64 ``[B]``: positions ``< kv_start[b]`` are masked out.
    scale : softmax scale (default ``1/sqrt(D)``).
    k_scale, v_scale : float16 ``[B, H_kv, T_c]``, required for an FP8 side and None otherwise
        (:func:`mustafar.format.quantize_fp8`).
    lengths : optional int32 ``[2] = (n_c, n_w)`` on q's device (never read on the host on CUDA): only
        compressed rows ``[0, n_c)`` (``n_c <= T_c``, the store's capacity) are attended, and the window
        is a ring of ``R = T_w`` slots whose row ``i < n_w <= R`` is slot ``(n_c + i) % R``. None:
        ``n_c = T_c``, ``n_w = T_w``, window row ``i`` in slot ``i``. Positions: compressed row ``r`` is
        ``r``, window row ``i`` is ``n_c + i`` (what ``kv_start`` masks).
    kernel : the CUDA decode kernel: ``"auto"`` (default rule, see the module docstring), ``"v4"``,
        ``"v5"``, ``"v6"``, ``"v6g"`` (these two also take ``lengths``, any G <= 8 and e4m3 values on both
        sides), ``"v6k"`` (v6 with K on tensor cores: ``lengths``, any G <= 8, 16-bit values), ``"v7"`` (every G, fp8 values, ``lengths``; k compiled in where instantiated) or
        ``"v7g"`` (v7, k at run time); one that cannot serve the dtype / shape raises ``ValueError``.
        CPU tensors take ``"auto"`` only; the reference backend ignores it.
    pdl : launch the CUDA merge kernel as a programmatic dependent of the decode kernel (default), or
        after it. Ignored off CUDA.

    Returns
    -------
    ``[B, H_q, D]`` in ``q.dtype``; zeros for a sequence with every position masked.
    """
    if not isinstance(kernel, str) or kernel not in DECODE_KERNELS:
        raise ValueError(f"kernel={kernel!r}: expected one of {', '.join(DECODE_KERNELS)}")
    if not isinstance(pdl, bool):
        raise ValueError(f"pdl={pdl!r} must be a bool")
    _check_float("q", q)
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H_q, D], got shape {tuple(q.shape)}")
    b, h_q, d = q.shape
    w = check_head_dim(d)
    for n, t in (("k_bitmap", k_bitmap), ("v_bitmap", v_bitmap)):
        _check_bitmap(n, t)
        if t.dim() != 4:
            raise ValueError(f"{n} must be [B, H_kv, T_c, W], got shape {tuple(t.shape)}")
    bb, h_kv, t_c, ww = k_bitmap.shape
    if bb != b:
        raise ValueError(f"k_bitmap batch {bb} != q batch {b}")
    if ww != w:
        raise ValueError(f"k_bitmap last dim {ww} != D/64 = {w} (D={d})")
    if h_kv <= 0 or h_q % h_kv != 0:
        raise ValueError(f"H_q={h_q} is not a multiple of H_kv={h_kv}")
    if tuple(v_bitmap.shape) != tuple(k_bitmap.shape):
        raise ValueError(f"v_bitmap shape {tuple(v_bitmap.shape)} != k_bitmap shape {tuple(k_bitmap.shape)}")
    for n, t, sn, st in (("k_values", k_values, "k_scale", k_scale), ("v_values", v_values, "v_scale", v_scale)):
        _check_scale(sn, st, n, _check_values(n, t, q.dtype, (b, h_kv, t_c), d), (b, h_kv, t_c))
    if (k_window is None) != (v_window is None):
        raise ValueError("k_window and v_window must both be given or both be None")
    if k_window is None:
        k_window = q.new_empty((b, h_kv, 0, d))
        v_window = k_window
    for n, t in (("k_window", k_window), ("v_window", v_window)):
        _check_float(n, t)
        if t.dtype != q.dtype:
            raise ValueError(f"{n}.dtype={t.dtype} != q.dtype={q.dtype}")
        if t.dim() != 4 or t.shape[:2] != (b, h_kv) or t.shape[3] != d:
            raise ValueError(f"{n} shape {tuple(t.shape)}: expected [{b}, {h_kv}, T_w, {d}]")
    if tuple(k_window.shape) != tuple(v_window.shape):
        raise ValueError(f"k_window shape {tuple(k_window.shape)} != v_window shape {tuple(v_window.shape)}")
    if kv_start is not None:
        if not isinstance(kv_start, torch.Tensor) or kv_start.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"kv_start must be an int32 tensor [B], got {getattr(kv_start, 'dtype', type(kv_start))}")
        if tuple(kv_start.shape) != (b,):
            raise ValueError(f"kv_start shape {tuple(kv_start.shape)} != [B] = [{b}]")
        kv_start = kv_start.to(torch.int32)
    if lengths is not None:
        _check_lengths(lengths)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale={scale} must be finite")
    dev = _same_device(q=q, k_bitmap=k_bitmap, k_values=k_values, v_bitmap=v_bitmap,
                       v_values=v_values, k_window=k_window, v_window=v_window, kv_start=kv_start,
                       k_scale=k_scale, v_scale=v_scale, lengths=lengths)
    be = backend(dev)
    if be == "reference":
        return reference.sparse_decode(q, k_bitmap, k_values, v_bitmap, v_values, k_window, v_window,
                                       kv_start, scale, k_scale=k_scale, v_scale=v_scale, lengths=lengths,
                                       kernel=kernel, pdl=pdl)
    return torch.ops.mustafar.sparse_decode(q, k_bitmap, k_values, v_bitmap, v_values, k_window,
                                            v_window, kv_start, scale, k_scale, v_scale, lengths, kernel, pdl)


def _check_int(name: str, x, lo: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < lo:
        raise ValueError(f"{name}={x!r} must be an int >= {lo}")
    return x


def append_decode(
    k: torch.Tensor,
    v: torch.Tensor,
    k_window: torch.Tensor,
    v_window: torch.Tensor,
    k_bitmap: torch.Tensor,
    k_values: torch.Tensor,
    v_bitmap: torch.Tensor,
    v_values: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    lengths: torch.Tensor,
    local_window: int,
    chunk: int,
) -> None:
    """One decode step of a preallocated cache layer, in place (what :func:`sparse_decode` with
    ``lengths`` then reads). No host read of ``lengths`` on CUDA.

    Parameters
    ----------
    k, v : ``[B, H, 1, D]`` the new token, in the windows' dtype (float16/bfloat16/float32).
    k_window, v_window : ``[B, H, R, D]`` ring buffers, ``R >= local_window + chunk + 1``.
    k_bitmap, v_bitmap : int64 ``[B, H, C, D // 64]`` the store (capacity ``C`` rows).
    k_values, v_values : ``[B, H, C, k_k]`` / ``[B, H, C, k_v]``: the windows' dtype or float8_e4m3fn.
    k_scale, v_scale : float16 ``[B, H, C]`` for an FP8 side, else None.
    lengths : int32 ``[2] = (n_c, n_w)``, updated in place.
    local_window : ``L >= 0``, tokens kept dense; chunk : ``>= 1``, tokens made visible at once.

    Semantics (``n = n_c + n_w``): the token goes to ring slot ``n % R``; the token ``e = n - L`` that
    leaves the ``L`` most recent ones is, when ``e >= max(0, n_c)``, pruned to its ``k_k`` / ``k_v``
    largest magnitudes (tie rule of :func:`prune_encode_topk`), quantized where that side is FP8
    (:func:`mustafar.format.quantize_fp8`) and written to store row ``e`` (``e < C``); then
    ``n_w += 1`` and, if ``n_w > L + chunk``, ``n_c += chunk`` and ``n_w -= chunk``.
    """
    local_window = _check_int("local_window", local_window, 0)
    chunk = _check_int("chunk", chunk, 1)
    _check_float("k_window", k_window)
    if k_window.dim() != 4:
        raise ValueError(f"k_window must be [B, H, R, D], got shape {tuple(k_window.shape)}")
    b, h, r, d = k_window.shape
    w = check_head_dim(d)
    if r < local_window + chunk + 1:
        raise ValueError(f"window ring of R={r} slots < local_window + chunk + 1 = {local_window + chunk + 1}")
    for n, t, shape in (("v_window", v_window, (b, h, r, d)), ("k", k, (b, h, 1, d)), ("v", v, (b, h, 1, d))):
        _check_float(n, t)
        if t.dtype != k_window.dtype:
            raise ValueError(f"{n}.dtype={t.dtype} != k_window.dtype={k_window.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{n} shape {tuple(t.shape)}: expected [{', '.join(map(str, shape))}]")
    for n, t in (("k_bitmap", k_bitmap), ("v_bitmap", v_bitmap)):
        _check_bitmap(n, t)
        if t.dim() != 4 or tuple(t.shape[:2]) != (b, h) or t.shape[3] != w:
            raise ValueError(f"{n} shape {tuple(t.shape)}: expected [{b}, {h}, C, {w}]")
    cap = k_bitmap.shape[2]
    if tuple(v_bitmap.shape) != tuple(k_bitmap.shape):
        raise ValueError(f"v_bitmap shape {tuple(v_bitmap.shape)} != k_bitmap shape {tuple(k_bitmap.shape)}")
    for n, t, sn, st in (("k_values", k_values, "k_scale", k_scale), ("v_values", v_values, "v_scale", v_scale)):
        _check_scale(sn, st, n, _check_values(n, t, k_window.dtype, (b, h, cap), d), (b, h, cap))
    _check_lengths(lengths)
    dev = _same_device(k=k, v=v, k_window=k_window, v_window=v_window, k_bitmap=k_bitmap, k_values=k_values,
                       v_bitmap=v_bitmap, v_values=v_values, k_scale=k_scale, v_scale=v_scale, lengths=lengths)
    if backend(dev) == "reference":
        return reference.append_decode(k, v, k_window, v_window, k_bitmap, k_values, v_bitmap, v_values,
                                       k_scale, v_scale, lengths, local_window, chunk)
    torch.ops.mustafar.append_decode(k, v, k_window, v_window, k_bitmap, k_values, v_bitmap, v_values,
                                     k_scale, v_scale, lengths, local_window, chunk)
