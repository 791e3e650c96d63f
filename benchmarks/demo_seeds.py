"""The demo's seed spread, with the fused halting unit off and on.

    python benchmarks/demo_seeds.py --seeds 0 1 2 --settings 0 auto --tag fused

Runs ``sact demo --seed S --out <work>/<setting>_seed<S>`` once per seed and per value of
``SACT_FUSED_HALTING`` (each run a fresh process with that environment), then writes the rows
(top-1 and FLOP ratio of vanilla, ACT and SACT; train time) and, per setting, their mean, min and
max to ``benchmarks/results/demo_seeds_<tag>.json`` and ``.md``. A setting's demo numbers are
"within the seed spread" of another's when each mean lies inside the other's min-max range; the
table is for a person to read, the script judges nothing.

Runs are interleaved (seed 0 of every setting, then seed 1, ...) so a machine that slows down
later in the run hits the settings alike. Finished runs are reused when their ``results.json``
exists (rerun with the same ``--work`` after an interruption).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("vanilla", "act", "sact")


def _run(setting: str, seed: int, out: Path, threads: int) -> dict:
    results = out / "results.json"
    if not results.exists():
        env = dict(os.environ, SACT_FUSED_HALTING=setting)
        cmd = [sys.executable, "-m", "sact.cli", "demo", "--seed", str(seed), "--out", str(out), "--no-progress"]
        if threads:
            cmd += ["--threads", str(threads)]
        if out.exists():
            cmd.append("--overwrite")
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        print(f"  {setting} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    data = json.loads(results.read_text())
    return {
        "setting": setting,
        "seed": seed,
        "total_time_s": data.get("total_time_s"),
        **{f"{r['mode']}_top1": r["top1"] for r in data["rows"]},
        **{f"{r['mode']}_flops": r["relative_flops"] for r in data["rows"]},
        **{f"{r['mode']}_train_s": r["train_time_s"] for r in data["rows"]},
    }


def _summary(rows: list[dict], settings: list[str]) -> dict:
    out = {}
    for s in settings:
        mine = [r for r in rows if r["setting"] == s]
        out[s] = {}
        for key in (f"{m}_{k}" for m in MODES for k in ("top1", "flops", "train_s")):
            vals = [r[key] for r in mine if key in r]
            if vals:
                out[s][key] = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
    return out


def _markdown(rows: list[dict], summary: dict, command: str) -> str:
    lines = [f"# The demo's seed spread\n\n`{command}`\n", "| setting | seed | vanilla top-1 | ACT top-1 | ACT FLOPs | SACT top-1 | SACT FLOPs | ACT+SACT train s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['seed']} | {r['vanilla_top1']:.2%} | {r['act_top1']:.2%} | {r['act_flops']:.0%} | "
            f"{r['sact_top1']:.2%} | {r['sact_flops']:.0%} | {r['act_train_s'] + r['sact_train_s']:.0f} |")
    lines += ["", "| setting | key | mean | min | max |", "|---|---|---|---|---|"]
    for s, keys in summary.items():
        for k, v in keys.items():
            if k.endswith("train_s"):
                lines.append(f"| {s} | {k} | {v['mean']:.1f} | {v['min']:.1f} | {v['max']:.1f} |")
            else:
                lines.append(f"| {s} | {k} | {v['mean']:.4f} | {v['min']:.4f} | {v['max']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=["0", "auto"], help="values of SACT_FUSED_HALTING")
    p.add_argument("--threads", type=int, default=0, help="sact demo --threads (default: torch's)")
    p.add_argument("--work", default="reports/demo_seeds", help="where the demo folders go")
    p.add_argument("--tag", default="fused")
    args = p.parse_args(argv)

    work = Path(args.work)
    rows = []
    for seed in args.seeds:
        for setting in args.settings:
            rows.append(_run(setting, seed, work / f"{setting}_seed{seed}", args.threads))
    summary = _summary(rows, args.settings)
    command = "python benchmarks/demo_seeds.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "command": command,
        "environment": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                        "torch": __import__("torch").__version__},
        "rows": rows,
        "summary": summary,
    }
    base = ROOT / "benchmarks" / "results" / f"demo_seeds_{args.tag}"
    base.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    base.with_suffix(".md").write_text(_markdown(rows, summary, command))
    print(_markdown(rows, summary, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
