"""``python -m mustafar.eval.peers``: run (or resume) the peers, or ``--merge`` results files."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def main(argv=None) -> int:
    import torch

    from . import __doc__ as doc
    from .run import merge, run_peers
    from .specs import PROFILES, profile_specs
    from .stats import summarize

    ap = argparse.ArgumentParser(prog="python -m mustafar.eval.peers", description=(doc or "").split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--profile", default="quick", choices=list(PROFILES))
    ap.add_argument("--out", default="results")
    ap.add_argument("--out-name", default=None)
    ap.add_argument("--tasks", default=None)
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--lengths", default=None)
    ap.add_argument("--families", default="dense,kvpress,quant,mustafar,joint")
    ap.add_argument("--variants", default="std,qic", help="std (kvpress's pipeline) and/or qic (question in context)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--prompts", default=None, help="prompts file (token ids) shared between the two environments")
    ap.add_argument("--merge", nargs="*", default=None, help="merge these result files into --out/--out-name and exit")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cmd = " ".join(["python -m mustafar.eval.peers"] + (sys.argv[1:] if argv is None else list(argv)))
    if a.merge is not None:
        res = merge(a.merge, Path(a.out) / (a.out_name or f"peers_{a.model.replace('/', '_')}.json"), cmd)
    else:
        from mustafar.models import load_model

        model, tok = load_model(a.model)
        cfg = model.config.get_text_config(decoder=True)
        D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        specs = profile_specs(D, families=tuple(a.families.split(",")), variants=tuple(a.variants.split(",")))
        res = run_peers(a.model, a.profile, a.out, a.out_name, specs=specs,
                        tasks=a.tasks.split(",") if a.tasks else None,
                        lengths=[int(x) for x in a.lengths.split(",")] if a.lengths else None,
                        samples=a.samples, model_obj=model, tokenizer=tok, resume=not a.no_resume, command=cmd,
                        prompts=a.prompts)
    import pandas as pd
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_rows", 200):
        print(summarize(res).drop(columns=["method", "ratio", "sparsity", "nbits"]).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
