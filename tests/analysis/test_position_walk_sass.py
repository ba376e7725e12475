"""CPU tests of ``scripts/position_walk_sass.py`` (the static SASS count of csrc/proto/position_walk.cu): the
parser and the per-slot arithmetic on a synthetic listing; the real count where nvcc and cuobjdump exist."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("position_walk_sass", os.path.join(ROOT, "scripts", "position_walk_sass.py"))
pws = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pws)


def _fn(name, ops):
    lines = [f"        /*{16 * i:04x}*/                   {op} R1, R2 ;" for i, op in enumerate(ops)]
    return f"\n\t\tFunction : {name}\n" + "\n".join(lines)


def test_count_and_marginal_on_a_synthetic_listing():
    sass = ""
    for kern, per in (("bitmap_walk", 12), ("gap_walk", 4), ("index_walk", 3)):
        for d, s1, s2 in ((128, 40, 64), (64, 19, 32)):
            for s in (s1, s2):
                ops = ["LDG"] * 3 + ["NOP"] * 5 + ["STS"] * s + ["IMAD"] * (per - 1) * s + ["EXIT"]
                sass += _fn(f"_ZN5proto{len(kern)}{kern}ILi{d}ELi{s}EEEvPKjS2_Pfi", ops)
    counts = pws.count_sass(sass)
    assert counts[("gap_walk", 128, 40)]["STS"] == 40 and "NOP" not in counts[("gap_walk", 128, 40)]
    rows = {(r["kernel"], r["D"]): r for r in pws.marginal(counts)}
    assert rows[("bitmap_walk", 128)]["per_slot"] == 12 and rows[("gap_walk", 64)]["per_slot"] == 4
    assert rows[("gap_walk", 128)]["opcodes_per_slot"] == {"IMAD": 3.0, "STS": 1.0}
    assert rows[("index_walk", 64)]["per_slot_no_ldg"] == 3


@pytest.mark.skipif(not shutil.which("nvcc") or not (os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")),
                    reason="needs nvcc and cuobjdump")
def test_the_position_codes_spend_fewer_instructions_per_slot_than_the_bitmap_walk(tmp_path):
    assert pws.main(["--out", str(tmp_path / "p.json")]) == 0
    import json

    rows = {(r["kernel"], r["D"]): r for r in json.loads((tmp_path / "p.json").read_text())["rows"]}
    for d in (64, 128):
        for kern in ("gap_walk", "index_walk"):
            assert rows[(kern, d)]["per_slot_no_ldg"] < rows[("bitmap_walk", d)]["per_slot_no_ldg"]
