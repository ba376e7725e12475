"""``python -m mustafar.eval sweep --model smollm2-135m --profile quick|full [--out results] [--longbench-dir DIR]``."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mustafar.eval", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sw = sub.add_parser("sweep", help="run/resume an accuracy sweep")
    sw.add_argument("--model", default="smollm2-135m")
    sw.add_argument("--profile", default="quick", choices=["quick", "full", "tiny"])
    sw.add_argument("--out", default="results", help="output folder (default results/)")
    sw.add_argument("--longbench-dir", default=None, help="folder with LongBench <dataset>.jsonl files")
    sw.add_argument("--suites", default="ruler,ppl,longbench", help="comma list of ruler,ppl,longbench")
    sw.add_argument("--no-resume", action="store_true", help="recompute every cell")
    sw.add_argument("--samples", type=int, default=None, help="override RULER samples per task")
    sw.add_argument("--lengths", default=None, help="override RULER context lengths, e.g. 1024,2048")
    sw.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    sw.add_argument("--tasks", default=None, help="override RULER tasks (comma list), e.g. to shard a sweep")
    sw.add_argument("--out-name", default=None, help="result file name (default accuracy_<model>.json); "
                    "shards can be merged with mustafar.eval.sweep.merge_results")
    sw.add_argument("--jobs", type=int, default=0,
                    help="run as N parallel one-thread shard processes and merge them; default (0): 2 when "
                         "the machine has >= 2 cores and neither --tasks nor --out-name is given, else 1")
    sm = sub.add_parser("summarize", help="print the summary and Pareto tables of a results JSON")
    sm.add_argument("path")
    sm.add_argument("--profile", default=None, help="cells of this profile (default: the last run's)")
    a = ap.parse_args(argv)
    if a.cmd == "sweep" and a.jobs == 0:
        import os

        a.jobs = 2 if (os.cpu_count() or 1) >= 2 and not a.tasks and not a.out_name and not a.threads else 1
    if a.cmd == "sweep" and a.jobs > 1:
        if a.tasks or a.out_name:
            ap.error("--jobs picks the shards' tasks and file names itself; drop --tasks / --out-name")
        from .sweep import run_sharded
        extra = [x for x in ("--no-resume",) if a.no_resume]
        for flag, val in (("--samples", a.samples), ("--lengths", a.lengths), ("--longbench-dir", a.longbench_dir)):
            if val:
                extra += [flag, str(val)]
        res = run_sharded(a.model, a.profile, a.jobs, out_dir=a.out, extra_args=extra)
    elif a.cmd == "sweep":
        import torch

        from .sweep import run_sweep
        from .tables import pareto, summarize
        if a.threads:
            torch.set_num_threads(a.threads)
        ov = {}
        if a.samples:
            ov["ruler_samples"] = a.samples
        if a.tasks:
            ov["ruler_tasks"] = tuple(a.tasks.split(","))
        if a.lengths:
            ov["ruler_lengths"] = tuple(int(x) for x in a.lengths.split(","))
        res = run_sweep(a.model, a.profile, out_dir=a.out, longbench_dir=a.longbench_dir, resume=not a.no_resume, out_name=a.out_name,
                        suites=tuple(s for s in a.suites.split(",") if s), command=" ".join(["python -m mustafar.eval"] + sys.argv[1:]),
                        **ov)
    else:
        from .sweep import load_results
        res = load_results(a.path)
    from .tables import pareto, summarize
    prof = getattr(a, "profile", None) if a.cmd == "summarize" else a.profile
    import pandas as pd
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print(summarize(res, profile=prof).to_string())
        p = pareto(res, profile=prof)
        print(p.to_string())
        print("smallest cache keeping >= 95% of dense avg:", p.attrs.get("smallest_keeping"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
