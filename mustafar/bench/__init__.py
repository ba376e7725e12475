"""Benchmarks: ``python -m mustafar.bench {cpu,kernel,e2e}``.

* ``cpu``: encoder throughput and sparse decode attention vs dense SDPA on this CPU
  (:mod:`mustafar.bench.cpu`, writes ``results/cpu_bench.json``).
* ``kernel``: CUDA decode kernels vs dense SDPA (:mod:`mustafar.bench.kernel`, needs a GPU).
* ``e2e``: end-to-end generation throughput (:mod:`mustafar.bench.e2e`, needs a GPU).

Subcommands are imported lazily, so ``cpu`` works without the GPU modules' dependencies.
"""
