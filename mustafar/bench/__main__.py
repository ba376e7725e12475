"""``python -m mustafar.bench <command> [options]``: the one CLI of the benchmarks.

Each command is ``mustafar.bench.<module>.main(argv)``; modules are imported lazily, so ``cpu`` works
without the GPU modules' dependencies.
"""

from __future__ import annotations

import importlib
import sys

#: command -> (module, one-line description)
COMMANDS = {
    "cpu": ("mustafar.bench.cpu", "encoder + sparse decode attention vs dense SDPA on this CPU"),
    "kernel": ("mustafar.bench.kernel", "CUDA decode kernels vs dense SDPA (GPU)"),
    "overhead": ("mustafar.bench.overhead", "fixed cost, kernels and host time of one fused decode call (GPU)"),
    "e2e": ("mustafar.bench.e2e", "end-to-end generation throughput (GPU; --grid/--longest: the e2e-grid)"),
    "e2e-grid": ("mustafar.bench.e2e_grid", "decode tokens/s grid and longest context from step times (GPU)"),
    "generate": ("mustafar.bench.generate_cpu", "SmolLM2 decode tokens/s, MustafarCache vs DynamicCache (CPU)"),
    "wallclock": ("mustafar.bench.wallclock", "end-to-end generation wall clock, eager vs compiled caches (CPU or GPU)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m mustafar.bench {" + ",".join(COMMANDS) + "} [options]", ""]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`python -m mustafar.bench <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown benchmark {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])  # lazy: GPU modules only when asked for
    rc = module.main(rest)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
