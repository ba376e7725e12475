"""Benchmarks: ``python -m mustafar.bench {cpu,kernel,overhead,e2e,e2e-grid,generate}``.

One module per benchmark, on top of the shared machinery:

* :mod:`~mustafar.bench.common`: timing, the results file with provenance, caches by name, the random
  fill of a cache, environment/device helpers; :mod:`~mustafar.bench.steps`: timed decode steps and
  the GPU-busy time of a profiled session.
* ``cpu`` (:mod:`~mustafar.bench.cpu`): encoder and sparse decode attention vs dense SDPA on this CPU
  (``results/cpu_bench.json``).
* ``kernel`` (:mod:`~mustafar.bench.kernel`): CUDA decode kernels vs dense SDPA (GPU,
  ``results/kernel_h200.json``).
* ``overhead`` (:mod:`~mustafar.bench.overhead`): the fixed cost of one fused decode call (GPU,
  ``results/decode_overhead_h200.json``).
* ``e2e`` (:mod:`~mustafar.bench.e2e`): end-to-end ``generate`` throughput, token checks, step timing
  (GPU, ``results/e2e_h200.json``).
* ``e2e-grid`` (:mod:`~mustafar.bench.e2e_grid`, arithmetic in :mod:`~mustafar.bench.e2e_plan`; also
  ``e2e --grid --longest``): decode tokens/s over contexts x caches x batches, and the longest context
  (GPU, ``results/e2e_grid_h200.json``).
* ``generate`` (:mod:`~mustafar.bench.generate_cpu`): SmolLM2 decode tokens/s, MustafarCache vs
  DynamicCache (CPU, ``results/generate_cpu.json``).

Subcommands are imported lazily, so ``cpu`` works without the GPU modules' dependencies.
"""
