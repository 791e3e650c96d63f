"""The figures the README and the docs quote are the ones in the result files committed commands write.

``benchmarks/demo_figures.py`` writes ``benchmarks/results/demo_figures.json`` (the demo's table and
time, the README's ponder-map canvas, the saliency of the demo's maps);
``benchmarks/export_runtime.py`` writes ``export_runtime_2threads.json``. When a run changes the
numbers, these tests fail until the docs quote the new ones.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = (ROOT / "README.md").read_text()


def _doc(name: str) -> str:
    return (ROOT / "docs" / name).read_text()


@pytest.fixture(scope="module")
def figures() -> dict:
    return json.loads((RESULTS / "demo_figures.json").read_text())


def _demo_row(row: dict) -> str:
    """The README's demo table row of one model (the cells after the name and tau)."""
    return (f"| {100 * row['top1']:.2f} | {row['flops_mean'] / 1e6:.2f} ({row['flops_std'] / 1e6:.2f}) | "
            f"{100 * row['relative_flops']:.1f}% | {row['box_ponder_ratio']:.3f} |")


def test_readme_demo_table_is_the_recorded_run(figures):
    rows = figures["demo"]["rows"]
    assert [r["mode"] for r in rows] == ["vanilla", "act", "sact"]
    for row in rows:
        assert _demo_row(row) in README, f"README's demo table lacks the recorded {row['mode']} row {_demo_row(row)}"
    sact_row = rows[2]
    assert f"at {100 * sact_row['relative_flops']:.0f}% of the FLOPs" in README
    assert f"{100 * sact_row['box_extra_share_inside']:.0f}% of them inside" in README


def test_demo_time_is_the_recorded_one_everywhere(figures):
    minutes = f"{figures['demo']['total_time_s'] / 60:.1f} min"
    quoted = {"README.md": README, "docs/demo.md": _doc("demo.md"), "docs/ponder_maps.md": _doc("ponder_maps.md")}
    for name, text in quoted.items():
        demo_times = re.findall(r"(\d+\.\d) min", text)
        assert minutes in text, f"{name} does not quote the recorded demo time {minutes}"
        assert demo_times, name
    assert f"**{minutes}**" in _doc("demo.md")


def test_ponder_map_caption_is_the_recorded_canvas(figures):
    rec = figures["figure"]["record"]
    text = _doc("ponder_maps.md")
    assert f"Ponder cost of this canvas {rec['ponder_cost']:.2f}, {rec['flops'] / 1e6:.1f} MFLOPs" in text
    sact_row = figures["demo"]["rows"][2]
    assert f"{100 * sact_row['top1']:.2f}% top-1 at {100 * sact_row['relative_flops']:.1f}% of the vanilla" in text


def test_saliency_figures_are_the_recorded_ones(figures):
    overall = figures["saliency"]["overall"]
    auc = {m: f"{overall[m]['auc_judd']:.3f}" for m in ("sact", "center_bias", "untrained_sact")}
    assert (f"AUC-Judd {auc['sact']} against the object masks (centre bias {auc['center_bias']}, "
            f"untrained SACT {auc['untrained_sact']})") in README
    saliency = _doc("saliency.md")
    for method, value in auc.items():
        assert f"| {method} | {overall[method]['n']} | {value} |" in saliency


def test_convert_tf_examples_are_its_help():
    from sact.cli import build_parser

    help_text = build_parser()._subparsers._group_actions[0].choices["convert-tf"].format_help()
    lines = [ln.strip() for ln in _doc("reference_models.md").splitlines() if ln.startswith("sact convert-tf ")]
    assert len(lines) == 3
    for line in lines:
        assert line in help_text, f"docs/reference_models.md: {line!r} is not an example of sact convert-tf --help"


def test_export_cost_claim_is_the_measured_one():
    rows = json.loads((RESULTS / "export_runtime_2threads.json").read_text())["rows"]
    ratios = [r["sact_over_vanilla"]["median"] for r in rows]
    claim = f"{min(ratios):.2f}-{max(ratios):.2f}x"
    assert claim in _doc("export.md"), f"docs/export.md should quote the measured {claim}"
