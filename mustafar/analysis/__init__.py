"""Library side of the notebooks: every computation a notebook shows lives here (notebooks hold
no function definitions). One module per notebook, plus what several share:

* :mod:`~mustafar.analysis.kv_distribution` - notebook 01: per-channel K/V magnitudes.
* :mod:`~mustafar.analysis.pruning_exploration` - notebook 02: attention-output error of every
  pruning strategy against sparsity, keep-masks.
* :mod:`~mustafar.analysis.kernel_speed` - notebook 03: bytes of the format against sparsity, the
  recorded GPU kernel benchmark in bar-plot form.
* :mod:`~mustafar.analysis.accuracy` - notebook 04: the accuracy sweep loaded (or run) and tabled.
* :mod:`~mustafar.analysis.peers` - notebook 04, recorded: MUSTAFAR against kvpress, quantized caches
  and the joint experiments at equal bytes (Pareto plot, table at ~0.56 / 0.36 / 0.2 of dense bytes).
* :mod:`~mustafar.analysis.throughput` - notebook 05, live: cache memory and CPU decode tokens/s.
* :mod:`~mustafar.analysis.e2e_grid` - notebook 05, recorded: the GPU end-to-end grid and the
  earlier runs it shows as history.

Shared:

* :mod:`~mustafar.analysis.results` - the one reader of ``results/`` (and ``results/archive/``)
  and of the files' provenance.
* :mod:`~mustafar.analysis.prompts` - the prompt and its captured Q/K/V (notebooks 01, 02).
* :mod:`~mustafar.analysis.availability` - which parts of ``mustafar`` import (every notebook).
* :mod:`~mustafar.analysis.plotting` - house style, ``save_figure`` and the plot helpers.

Import the modules themselves (``from mustafar.analysis import results, plotting``); this package
re-exports nothing.
"""
