"""Timed decode steps through a model, and the GPU-busy time of a ``torch.profiler`` session.

Shared by the e2e generate benchmark (``--step-timing``) and the e2e grid: :func:`run_steps` runs
greedy decode steps on a filled cache, times each on the wall clock and, on CUDA, reads the GPU-busy
time of a few more under ``torch.profiler`` (:func:`kernel_us`: the union of the kernels' time
intervals, :func:`busy_us`).
"""

from __future__ import annotations

import sys

import torch

from mustafar.bench import common

__all__ = ["busy_us", "kernel_us", "run_steps"]

_KINETO_FAST: bool | None = None  # whether the raw kineto event sum matched prof.events() (decided at first use)


def kineto_source() -> str:
    """Which events :func:`kernel_us` reads (recorded in the grid's JSON as ``kernel_time_source``)."""
    return {None: "none read yet (or no device events: CPU)",
            True: "raw kineto device events (equal to prof.events() at first use)",
            False: "prof.events() device events"}[_KINETO_FAST]


def busy_us(intervals) -> float:
    """Length of the union of ``(start, end)`` intervals (any unit): time during which any of them runs.

    Parameters
    ----------
    intervals : iterable of (float, float)

    Returns
    -------
    float
    """
    total, cur_s, cur_e = 0.0, None, None
    for st, en in sorted(intervals):
        if cur_e is None or st > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = st, en
        else:
            cur_e = max(cur_e, en)
    return float(total + (cur_e - cur_s if cur_e is not None else 0.0))


def kernel_us(prof) -> float:
    """GPU-busy time (us) of a finished ``torch.profiler`` session: the length of the union of the
    device (CUDA) events' time intervals, so that work overlapping in time counts once (the decode's
    merge kernel is launched as a programmatic dependent and runs, waiting, alongside the decode
    kernel; a plain sum of kernel durations counted that stretch twice).

    ``prof.events()`` builds the whole CPU/GPU event tree in Python (~0.5-1 s for three 32-layer
    decode steps); the same intervals are read straight from the raw kineto events when they agree with
    it. The first session that has device events computes both and keeps the fast path only if they
    agree within 0.5 %; otherwise (or if the private kineto API is missing) ``prof.events()`` is used."""
    global _KINETO_FAST
    from torch.autograd import DeviceType

    def slow():
        return busy_us((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == DeviceType.CUDA)

    if _KINETO_FAST is False:
        return slow()
    try:
        from torch.autograd.profiler_util import _filter_name

        fast = busy_us((e.start_ns(), e.start_ns() + e.duration_ns()) for e in prof.profiler.kineto_results.events()
                       if e.device_type() == DeviceType.CUDA and not _filter_name(e.name())
                       and not getattr(e, "is_hidden_event", lambda: False)()) / 1e3
    except Exception:  # noqa: BLE001  (private API of torch.profiler)
        _KINETO_FAST = False
        return slow()
    if _KINETO_FAST is None:
        ref = slow()
        if ref > 0:
            _KINETO_FAST = abs(fast - ref) <= 5e-3 * ref
            if not _KINETO_FAST:
                print(f"mustafar.bench: kineto busy time {fast:.1f} us != prof.events() {ref:.1f} us; using "
                      "prof.events() (~1 s more per profiled measurement)", file=sys.stderr, flush=True)
        return ref
    return fast


def run_steps(model, cache, nxt, pos: int, steps: int, profile_steps: int = 3, profile_log=None,
              label: str = "") -> dict:
    """Greedy decode steps through the real model at positions ``pos, pos + 1, ...`` on ``cache``.

    ``steps`` steps are timed one by one (synchronised wall clock, :func:`common.timed_call`); then
    ``profile_steps`` more run under ``torch.profiler`` when the model is on CUDA (or ``profile_log``
    is given): their GPU-busy time (union of the kernels' intervals, :func:`kernel_us`) /
    ``profile_steps`` is ``gpu_busy_ms`` (``None`` without device events, e.g. on CPU).
    ``profiled_wall_ms`` is the wall clock per profiled step (profiler overhead included).

    Parameters
    ----------
    model : transformers causal LM
    cache : a filled cache (:func:`common.fill_cache` or a prefill)
    nxt : LongTensor ``[B, 1]``
        The token ids of the first step.
    pos : int
        Position of the first step.
    steps, profile_steps : int
        Wall-clock-timed steps, then profiled steps.
    profile_log : callable, optional
        Print-like; gets the profiler's operator table (largest CPU time first).
    label : str
        Named in the logged table.

    Returns
    -------
    dict
        ``times_ms`` (list, one per timed step), ``step_ms_median`` (:func:`common.upper_median`),
        ``profiled_wall_ms``, ``gpu_busy_ms``, ``next`` (the last greedy token ``[B, 1]``) and ``pos``
        (the next position).
    """
    from mustafar import cache_kwargs

    batch, dev = nxt.shape[0], nxt.device
    kw = cache_kwargs(model, cache)

    def step(nxt, p):  # one greedy decode step at position p
        position = torch.full((batch, 1), p, device=dev, dtype=torch.long)
        return model(input_ids=nxt, use_cache=True, position_ids=position, **kw).logits[:, -1:].argmax(-1)

    times, gpu_ms, prof_wall = [], None, None
    with torch.inference_mode():
        for _ in range(steps):
            nxt, sec = common.timed_call(lambda: step(nxt, pos), dev)
            times.append(sec * 1e3)
            pos += 1
        if profile_steps > 0:
            use_prof = dev.type == "cuda" or profile_log is not None

            def profiled():
                nonlocal nxt, pos
                for _ in range(profile_steps):
                    nxt = step(nxt, pos)
                    pos += 1
                common.sync(dev)

            if use_prof:
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
                common.sync(dev)
                t0 = common._now()
                with profile(activities=acts) as prof:
                    profiled()
                prof_wall = (common._now() - t0) * 1e3 / profile_steps
                kern = kernel_us(prof)
                gpu_ms = kern / (profile_steps * 1e3) if kern > 0 else None
                if profile_log is not None:
                    profile_log(f"profile of {profile_steps} decode steps ({label}):\n"
                                + prof.key_averages().table(sort_by="cpu_time_total", row_limit=14,
                                                            max_name_column_width=48))
            else:
                _, sec = common.timed_call(profiled, dev)
                prof_wall = sec * 1e3 / profile_steps
    return {"times_ms": times, "step_ms_median": common.upper_median(times), "profiled_wall_ms": prof_wall,
            "gpu_busy_ms": gpu_ms, "next": nxt, "pos": pos}
