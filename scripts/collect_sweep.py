"""Collect the trials of a Hydra multirun (a hparams_search sweep, or any `-m` run) into one table.

Every run directory below the sweep directory that holds a `results.json` is a row: its swept overrides (the keys
whose values differ between runs, read from Hydra's `.hydra/overrides.yaml`), `val/acc`, `test/acc` and a few
bookkeeping columns. Rows are sorted by `val/acc`, best first: the validation split chooses, the test split is only
reported. Writes `sweep.csv` and `sweep.md` into the sweep directory (or where `--out` says) and prints the table.

    python scripts/collect_sweep.py logs/train/multiruns/2025-01-01_12-00-00
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import yaml

METRICS = ["val/acc", "test/acc"]
EXTRA = ["epochs", "fit_seconds", "n_train", "scenario", "model"]


def read_overrides(run_dir: Path) -> dict[str, str]:
    """The run's command-line overrides as {key: value} (empty if Hydra wrote none)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    items = yaml.safe_load(path.read_text()) or []
    return dict(item.split("=", 1) for item in items if "=" in item)


def collect(sweep_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (one per run with a results.json, best val/acc first) and the names of the swept keys."""
    runs = sorted(p.parent for p in sweep_dir.rglob("results.json"))
    overrides = {run: read_overrides(run) for run in runs}
    keys = sorted({k for o in overrides.values() for k in o})
    swept = [k for k in keys if len({o.get(k) for o in overrides.values()}) > 1]
    rows = []
    for run in runs:
        results = json.loads((run / "results.json").read_text())
        row: dict[str, Any] = {"run": str(run.relative_to(sweep_dir)) or "."}
        row.update({m: results.get(m) for m in METRICS})
        row.update({k: overrides[run].get(k) for k in swept})
        row.update({k: results.get(k) for k in EXTRA})
        rows.append(row)

    def key(row: dict[str, Any]) -> float:
        value = row.get("val/acc")
        return -value if isinstance(value, (int, float)) and not math.isnan(value) else math.inf

    return sorted(rows, key=key), swept


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    try:  # overrides are strings: shorten long floats such as 0.0013292918943162175
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{number:.4g}" if "." in str(value) or "e" in str(value).lower() else str(value)


def to_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _starts_with(path: Path, head: str) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(head)) == head.encode()
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the multirun directory (hydra.sweep.dir)")
    parser.add_argument("--out", type=Path, default=None, help="where to write sweep.csv and sweep.md "
                                                               "(default: the sweep directory)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"collect_sweep: error: {str(args.sweep_dir)!r} is not a directory", file=sys.stderr)
        return 2
    rows, _ = collect(args.sweep_dir)
    if not rows:
        print(f"collect_sweep: error: no results.json below {str(args.sweep_dir)!r} (no finished trial yet?)",
              file=sys.stderr)
        return 2
    out = args.out or args.sweep_dir
    if out.exists() and not out.is_dir():
        print(f"collect_sweep: error: --out {str(out)!r} exists and is not a folder: give a folder", file=sys.stderr)
        return 2
    for name, head in (("sweep.md", "| run |"), ("sweep.csv", "run,")):  # how this script's own tables start
        if (out / name).exists() and not _starts_with(out / name, head):
            print(f"collect_sweep: error: {str(out / name)!r} exists and was not written by collect_sweep: it would "
                  "be replaced; give --out another folder", file=sys.stderr)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "sweep.csv")
    markdown = to_markdown(rows)
    (out / "sweep.md").write_text(markdown)
    print(markdown, end="")
    print(f"{len(rows)} runs; wrote {out / 'sweep.csv'} and {out / 'sweep.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
