"""Position codes for the kept channels of a pruned row: what each would cost in bytes on real K / V.

Issue #15 asks for a decode that spends few instructions per stored value. Walking a bitmap costs ~9 SASS
instructions per value just to find the value's channel (``docs/kernel_design.md``); a layout that stores
positions is cheaper to decode but costs bytes. This module measures the bytes of three position codes on
the rows the cache would store (per-token top-k by magnitude), so that the choice rests on real K / V and
not on random rows:

* ``bitmap``: the paper's format, ``D / 8`` bytes per row whatever k is;
* ``byte index``: one channel byte per kept value, ``k`` bytes;
* ``gap nibbles``: per kept value the number of pruned channels before it (after the previous kept one) in
  a 4-bit code; code 15 is an escape ("15 more pruned channels, no value"), so a gap ``g`` takes
  ``1 + g // 15`` nibbles and a row ``k + sum(g // 15)`` nibbles. A fixed-width store (the cache's rows have
  one width) holds ``k + E`` nibbles: rows that need more than ``E`` escapes must take a fallback path
  (e.g. a flag and the bitmap), so the fraction of such rows matters as much as the mean;
* ``gap nibbles with filler slots`` (the variant ``csrc/proto/position_walk.cu`` decodes): every code 0-15 is a
  gap, and a gap over 15 is bridged by a filler slot (a zero value at a pruned channel), so a gap ``g`` needs
  ``g // 16`` fillers and every slot carries a value (2 bytes more per filler with 16-bit values); a row of
  ``k + E`` slots has no escapes to decode, and rows that need more than ``E`` fillers overflow.

Everything here is plain torch on any device; ``scripts/position_codes.py`` runs it on the local models.
"""

from __future__ import annotations

import torch

__all__ = ["kept_channels", "gaps", "gap_escapes", "filler_slots", "code_bytes", "row_bytes", "row_stats", "run"]

ESCAPE = 15  # the nibble code that skips 15 channels without a value


def kept_channels(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted channel indices of each row's ``k`` largest-magnitude entries (the cache's per-token top-k).

    Parameters
    ----------
    x : torch.Tensor
        ``[..., D]`` floating.
    k : int
        kept values per row, ``1 <= k <= D``.

    Returns
    -------
    torch.Tensor
        int64 ``[N, k]`` (rows flattened), ascending along the last dimension.
    """
    d = x.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d:
        raise ValueError(f"k must be an int in [1, {d}] (D={d}), got {k!r}")
    rows = x.reshape(-1, d).float().abs()
    return rows.topk(k, dim=-1).indices.sort(dim=-1).values


def gaps(channels: torch.Tensor) -> torch.Tensor:
    """Pruned channels before each kept one (after the previous kept one; from channel 0 for the first).

    Parameters
    ----------
    channels : torch.Tensor
        int ``[N, k]`` ascending kept channels per row (:func:`kept_channels`).

    Returns
    -------
    torch.Tensor
        int64 ``[N, k]``, >= 0.
    """
    if channels.dim() != 2:
        raise ValueError(f"channels must be [N, k], got shape {tuple(channels.shape)}")
    prev = torch.cat([channels.new_full((channels.shape[0], 1), -1), channels[:, :-1]], dim=1)
    g = channels - prev - 1
    if (g < 0).any():
        raise ValueError("channels must be strictly ascending along each row")
    return g


def gap_escapes(channels: torch.Tensor) -> torch.Tensor:
    """Escape nibbles each row's gap code needs (code 15 = skip 15): ``sum(g // 15)`` over its :func:`gaps`;
    int64 ``[N]``."""
    return (gaps(channels) // ESCAPE).sum(dim=1)


def filler_slots(channels: torch.Tensor) -> torch.Tensor:
    """Filler slots each row needs when every code 0-15 is a gap: ``sum(g // 16)``; int64 ``[N]``."""
    from mustafar.gapcode import SPAN

    return (gaps(channels) // SPAN).sum(dim=1)


def code_bytes(d: int, k: int, escapes_capacity: int | None = None) -> dict:
    """Bytes per row of each position code (values not included).

    ``escapes_capacity`` (``E``): the gap code's fixed row width, ``k + E`` codes in whole 32-bit words of 8
    (:func:`mustafar.gapcode.code_bytes`, the layout the walks read); ``None`` gives only the bitmap and the byte index.
    """
    from mustafar.gapcode import code_bytes as gap_code_bytes

    out = {"bitmap": d // 8, "byte_index": k}
    if escapes_capacity is not None:
        out["gap_nibbles"] = gap_code_bytes(k + escapes_capacity)
    return out


def row_stats(x: torch.Tensor, k: int, capacities=(0, 1, 2, 4, 8)) -> dict:
    """The gap code's escapes on the top-k rows of ``x`` ``[..., D]``, and each code's bytes.

    Returns
    -------
    dict
        ``rows``, ``D``, ``k``, ``mean_escapes``, ``max_escapes``, ``p99_escapes``, ``rows_without_escape``
        (fraction), the same for filler slots (``mean_fillers``, ``max_fillers``, ``p99_fillers``), and per
        capacity ``E``: ``gap_bytes`` (the codes' row width), ``overflow`` / ``filler_overflow`` (fraction of
        rows that need more than ``E`` escapes / fillers); ``bitmap_bytes``, ``byte_index_bytes``.
    """
    d = x.shape[-1]
    ch = kept_channels(x, k)
    esc, fil = gap_escapes(ch), filler_slots(ch)
    n = esc.numel()
    escf, filf = esc.float(), fil.float()
    res = dict(rows=n, D=d, k=k, mean_escapes=float(escf.mean()), max_escapes=int(esc.max()),
               p99_escapes=float(escf.quantile(0.99)) if n > 1 else float(escf.max()),
               rows_without_escape=float((esc == 0).float().mean()),
               mean_fillers=float(filf.mean()), max_fillers=int(fil.max()),
               p99_fillers=float(filf.quantile(0.99)) if n > 1 else float(filf.max()),
               bitmap_bytes=code_bytes(d, k)["bitmap"], byte_index_bytes=k, capacities={})
    for e in capacities:
        res["capacities"][int(e)] = dict(gap_bytes=code_bytes(d, k, e)["gap_nibbles"],
                                         overflow=float((esc > e).float().mean()),
                                         filler_overflow=float((fil > e).float().mean()))
    return res


def row_bytes(d: int, k: int, escapes_capacity: int) -> dict:
    """Bytes of one stored row with 16-bit values (``2k``) under each position code, and each over the dense
    fp16 row (``2D``)."""
    pos = code_bytes(d, k, escapes_capacity)
    return {name: dict(bytes=b + 2 * k, of_dense=(b + 2 * k) / (2 * d)) for name, b in pos.items()}


def run(models=("smollm2-135m", "gemma3-270m"), sparsities=(0.5, 0.6, 0.7, 0.8), prompt_tokens: int = 1024,
        random_dims=(64, 128, 256), random_rows: int = 1 << 16, seed: int = 0, log=print) -> dict:
    """:func:`row_stats` of every layer's K and V (all layers pooled per side) of each local model on one
    prose prompt, at each sparsity; and of Gaussian rows (the kernel benchmark's inputs) at ``random_dims``."""
    from tqdm.auto import tqdm

    from mustafar.analysis.prompts import capture_prompt, prompt_ids
    from mustafar.models import load_model
    from mustafar.pruning._common import kept_count

    rows = []
    for name in tqdm(models, desc="models"):
        model, tok = load_model(name)
        qkv = capture_prompt(model, prompt_ids(tok, prompt_tokens))
        for side in ("k", "v"):
            d = next(iter(qkv.values()))[side].shape[-1]
            x = torch.cat([qkv[li][side].reshape(-1, d) for li in qkv])
            for s in sparsities:
                k = kept_count(d, s)
                r = dict(source=name, side=side.upper(), sparsity=s, **row_stats(x, k))
                rows.append(r)
                log(f"{name} {side.upper()} {s:.0%}: D={d} k={k} escapes/row mean {r['mean_escapes']:.2f} max "
                    f"{r['max_escapes']}, rows without {r['rows_without_escape']:.1%}")
        del model, qkv
    g = torch.Generator().manual_seed(seed)
    for d in random_dims:
        x = torch.randn(random_rows, d, generator=g)
        for s in sparsities:
            k = kept_count(d, s)
            rows.append(dict(source="gaussian", side="-", sparsity=s, **row_stats(x, k)))
    return dict(rows=rows, prompt_tokens=prompt_tokens, escape_code=ESCAPE)


def main(argv=None) -> int:
    import argparse
    import sys

    from mustafar.bench.common import default_out, write_results

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m mustafar.analysis.position_codes", description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--out", default=None, help="default results/position_codes.json")
    args = ap.parse_args(argv)
    res = run(prompt_tokens=args.prompt_tokens)
    path = write_results(args.out or default_out("position_codes.json"), res,
                         " ".join(["python -m mustafar.analysis.position_codes", *argv]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
