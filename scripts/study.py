"""The 2x2 study: every scenario preset, `auto`, training from scratch and the scikit-learn linear probe, at a small
and a large data size, over several seeds — one Hydra multirun per data size and baseline — then tables and plots.

    python scripts/study.py --out logs/study/digits --sizes 10 full --seeds 0 1 2
    python scripts/study.py --out logs/study/digits --collect-only          # rebuild the report from the runs
    python scripts/study.py --out logs/study/flowers --sizes 10 full -- data=imagefolder data.root=DIR
    python scripts/study.py --out logs/study16 --datasets /tmp/tl_datasets/{fonts,photo_patches,textures} \
        --sizes 10 100 --seeds 0 1 2                                      # several image folders: a summary

Overrides after `--` go to every run. Writes OUT/study.csv (one row per run), OUT/study.md (mean +- std of test
accuracy per policy and size, with the preset auto chose) and OUT/study.png. With `--datasets DIR ...` each image
folder gets its own OUT/<name>/ (`data=imagefolder data.root=DIR` added to the overrides) with those three files,
and OUT/summary.md + OUT/summary.png compare, per dataset and size, auto with the linear probe at the backbone's
resolution, the best fixed preset and training from scratch (issue 16's targets). A size larger than a dataset's
smallest class in train runs on the whole train split (reported as that size, marked "(all)").

The `probe` sweep is `scripts/probe_baseline.py` on the same splits and training subsets (`probe`: the backbone's
input size; `probe@auto`: the side auto trained at, per seed, once auto's runs exist). `--policies` picks the
transfer policies to run (default: the four presets and auto).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import json
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
PRESETS = ["small_similar", "small_different", "large_similar", "large_different"]
# From scratch everything trains at one LR; it gets the schedule of the preset for its data size, so it is not
# starved of optimizer steps at small sizes (batch 16 x 30 epochs there, as small_different).
SCRATCH = {
    "small": ["scenario=small_different", "finetune.strategy=full", "finetune.backbone_lr_mult=1.0",
              "model.pretrained=none"],
    "full": ["scenario=large_different", "model.pretrained=none"],
}
SWEEPS = ("transfer", "scratch", "probe")


def fail(message: str, code: int = 2) -> None:
    """Exit as argparse does for bad input: `study.py: error: ...`, status 2 (1 for a run that failed)."""
    print(f"study.py: error: {message}", file=sys.stderr)
    sys.exit(code)


def _probe_module():
    spec = importlib.util.spec_from_file_location("probe_baseline", HERE / "probe_baseline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def base_scenario(extra: list[str]) -> str:
    """The scenario the study composes its overrides with to read the data: auto where they set auto's own keys
    (`scenario.small_budget_minutes=...`, only with `--policies auto`), else a fixed preset."""
    return "auto" if any(o.lstrip("+~").startswith("scenario.") for o in extra) else "small_similar"


def per_class_arg(size: str, extra: list[str], seed: int) -> str:
    """`data.samples_per_class` for a study size: the number, or null where it is "full" or more than the smallest
    class has in train (the whole train split then runs, as the size's best stand-in)."""
    if size == "full":
        return "null"
    from tl.config import compose_config
    from tl.data.datamodule import build_datamodule
    from tl.data.transforms import backbone_preprocess

    cfg = compose_config([*extra, f"scenario={base_scenario(extra)}", f"seed={seed}"])  # validated in main()
    datamodule = build_datamodule(cfg.data, backbone_preprocess(cfg.model.name), None, seed)
    datamodule.setup("fit")
    counts = np.bincount(datamodule.images.targets[datamodule.split_indices["train"]])
    return size if int(size) <= int(counts[counts > 0].min()) else "null"


def run_sweeps(out: Path, sizes: list[str], seeds: list[int], extra: list[str], which: list[str],
               policies: list[str]) -> None:
    seed_list = ",".join(map(str, seeds))
    for size in sizes:
        per_class = per_class_arg(size, extra, seeds[0])
        common = [f"data.samples_per_class={per_class}", f"seed={seed_list}", *extra]
        sweeps = {
            "transfer": [f"scenario={','.join(policies)}"],
            "scratch": SCRATCH["full" if per_class == "null" else "small"],
        }
        for name, overrides in sweeps.items():
            if name not in which:
                continue
            sweep_dir = out / f"{size}-{name}"
            cmd = [sys.executable, "-m", "tl.train", "-m", *overrides, *common, f"hydra.sweep.dir={sweep_dir}",
                   "callbacks.progress=null", "trainer.enable_progress_bar=false"]
            print("+", " ".join(cmd), flush=True)
            run_child(cmd)
        if "probe" in which:
            run_probes(out, size, per_class, seeds, extra)


def run_child(cmd: list[str]) -> None:
    """Run one `tl.train -m` sweep and wait for it, also when this script is signalled: a SIGTERM (a scheduler's, or
    `timeout`) is passed on to the sweep, which saves its run's state, and Ctrl-C (which reaches both) waits for
    that. Found by a hostile tester: on SIGTERM the script exited at once and left the sweep running on, orphaned."""
    proc = subprocess.Popen(cmd)
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # the sweep got it too, in the same process group: let it save and exit
                received.append(signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if received:
        name = "SIGTERM" if signal.SIGTERM in received else "Ctrl-C"
        fail(f"interrupted by {name}: the sweep in progress was stopped and has said above what it kept",
             code=128 + int(received[0]))
    if code != 0:
        raise subprocess.CalledProcessError(code, cmd)


def run_probes(out: Path, size: str, per_class: str, seeds: list[int], extra: list[str]) -> None:
    """The linear probe at the backbone's side and at auto's side (from auto's runs of this size, per seed)."""
    probe = _probe_module()
    path = out / f"{size}-probe.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    done = {(r["seed"], r["policy"]) for r in rows}
    auto_side = {r["seed"]: r["side"] for r in collect(out) if r["size"] == size and r["policy"] == "auto"}
    sample = "full" if per_class == "null" else per_class
    for seed in seeds:
        wanted = [("probe", "native")]
        if seed in auto_side:
            wanted.append(("probe@auto", str(auto_side[seed])))
        for policy, side in wanted:
            if (seed, policy) in done:
                continue
            row = probe.run(extra, sample, seed, side)
            rows.append({**row, "policy": policy, "size": size})
            print(json.dumps(rows[-1]), flush=True)
            path.write_text(json.dumps({"overrides": extra, "rows": rows}, indent=2) + "\n")


def collect(out: Path) -> list[dict]:
    rows = []
    for results_file in sorted(out.glob("*/*/results.json")):
        run = results_file.parent
        size = run.parent.name.split("-", 1)[0]
        overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        asked = dict(o.split("=", 1) for o in overrides if "=" in o)
        r = json.loads(results_file.read_text())
        policy = "scratch" if asked.get("model.pretrained") == "none" else asked.get("scenario", r["scenario"])
        plan = (r.get("scenario_evidence") or {}).get("plan") or {}
        rows.append({"size": size, "policy": policy, "resolved": r["scenario"], "seed": r["seed"],
                     "n_train": r["n_train"], "test_acc": r["test/acc"], "val_acc": r["val/acc"],
                     "fit_seconds": r["fit_seconds"], "epochs": r["epochs"],
                     "side": plan.get("side", ""), "run": str(run)})
    for probe_file in sorted(out.glob("*-probe.json")):
        for r in json.loads(probe_file.read_text())["rows"]:
            rows.append({"size": r["size"], "policy": r["policy"], "resolved": r["policy"], "seed": r["seed"],
                         "n_train": r["n_train"], "test_acc": r["test_acc"], "val_acc": "",
                         "fit_seconds": r["seconds"], "epochs": "", "side": r["pixels"], "run": str(probe_file)})
    return rows


def _sizes(rows: list[dict]) -> list[str]:
    return sorted({r["size"] for r in rows}, key=lambda s: (s == "full", int(s) if s.isdigit() else 0))


def report(out: Path, rows: list[dict], title: str = "") -> str:
    with open(out / "study.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    sizes = _sizes(rows)
    order = [*PRESETS, "auto", "scratch", "probe", "probe@auto"]
    policies = [p for p in order if any(r["policy"] == p for r in rows)]
    acc = defaultdict(list)
    chosen = defaultdict(set)
    for r in rows:
        acc[r["policy"], r["size"]].append(r["test_acc"])
        if r["policy"] == "auto":
            chosen[r["size"]].add(f"{r['resolved']} @{r['side']}px" if r["side"] else r["resolved"])
    n_train = {s: sorted({r["n_train"] for r in rows if r["size"] == s}) for s in sizes}
    head = [f"{s}/class (n_train {n_train[s][0]})" if s != "full" else f"full (n_train {n_train[s][0]})"
            for s in sizes]
    lines = ["| policy | " + " | ".join(head) + " |", "|---|" + "---|" * len(sizes)]
    for p in policies:
        cells = []
        for s in sizes:
            v = acc.get((p, s), [])
            cell = f"{np.mean(v):.4f} ± {np.std(v):.4f} (n={len(v)})" if v else "–"
            if p == "auto" and chosen[s]:
                cell += f" → {', '.join(sorted(chosen[s]))}"
            cells.append(cell)
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "study.md").write_text((f"# {title}\n\n" if title else "") + "Test accuracy, mean ± std over seeds.\n\n"
                                  + table + "\n")
    plot(out / "study.png", sizes, policies, acc, title or "Transfer policies vs training from scratch")
    return table


def plot(path: Path, sizes: list[str], policies: list[str], acc: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(policies)
    for i, p in enumerate(policies):
        means = [np.mean(acc.get((p, s), [np.nan])) for s in sizes]
        stds = [np.std(acc.get((p, s), [np.nan])) for s in sizes]
        ax.bar(np.arange(len(sizes)) + i * width, means, width, yerr=stds, label=p, capsize=3)
    ax.set_xticks(np.arange(len(sizes)) + width * (len(policies) - 1) / 2)
    ax.set_xticklabels([f"{s} per class" if s != "full" else "full train split" for s in sizes])
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncols=len(policies), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _margin(auto: float | None, other: float | None, need: float) -> str:
    if auto is None or other is None:
        return "–"
    d = 100 * (auto - other)
    return f"{d:+.1f} ({'met' if d >= need else 'not met'})"


def summarize(out: Path, per_dataset: dict[str, list[dict]]) -> str:
    """One line per dataset and size: auto against the probe at the backbone's side, the best fixed preset (by mean
    test accuracy over the seeds run) and scratch, with issue 16's margins (6 points over the probe at 10 per class,
    4 at larger sizes; the best preset minus 1; scratch plus 15)."""
    lines = ["| dataset | size | n_train | probe | auto | auto − probe | best preset | auto − best | scratch | "
             "auto − scratch | auto fit s |", "|---|" + "---|" * 10]
    bars = {}
    for name, rows in per_dataset.items():
        for size in _sizes(rows):
            acc = defaultdict(list)
            for r in rows:
                if r["size"] == size:
                    acc[r["policy"]].append(r["test_acc"])
            mean = {p: float(np.mean(v)) for p, v in acc.items()}
            best = max((p for p in PRESETS if p in mean), key=mean.get, default=None)
            auto = mean.get("auto")
            cells = {p: f"{mean[p]:.3f} (n={len(acc[p])})" if p in mean else "–" for p in ("probe", "auto", "scratch")}
            fit = [r["fit_seconds"] for r in rows if r["size"] == size and r["policy"] == "auto"]
            n_train = sorted({r["n_train"] for r in rows if r["size"] == size})
            lines.append(" | ".join([
                f"| {name}", size, str(n_train[0]), cells["probe"], cells["auto"],
                _margin(auto, mean.get("probe"), 6 if size == "10" else 4),
                f"{best} {mean[best]:.3f}" if best else "–", _margin(auto, mean.get(best), -1), cells["scratch"],
                _margin(auto, mean.get("scratch"), 15), f"{np.mean(fit):.0f} |" if fit else "– |"]))
            bars[name, size] = {"probe": mean.get("probe", np.nan), "auto": mean.get("auto", np.nan),
                                "best preset": mean[best] if best else np.nan, "scratch": mean.get("scratch", np.nan)}
    table = "\n".join(lines)
    (out / "summary.md").write_text(
        "Test accuracy, mean over seeds (n = runs). Margins in points; targets: auto − probe >= 6 at 10 per class "
        "and >= 4 above it, auto − best preset >= −1, auto − scratch >= 15.\n\n" + table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(bars)
    series = ["probe", "auto", "best preset", "scratch"]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys)), 4))
    width = 0.8 / len(series)
    for i, p in enumerate(series):
        ax.bar(np.arange(len(keys)) + i * width, [bars[k][p] for k in keys], width, label=p)
    ax.set_xticks(np.arange(len(keys)) + width * (len(series) - 1) / 2)
    ax.set_xticklabels([f"{n}\n{s}/class" if s != "full" else f"{n}\nfull" for n, s in keys], fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncols=len(series), loc="upper center", bbox_to_anchor=(0.5, -0.15), frameon=False)
    ax.set_title("auto vs the linear probe, the best preset and scratch")
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=120)
    plt.close(fig)
    return table


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("logs/study/digits"))
    parser.add_argument("--datasets", nargs="+", type=Path, default=[],
                        help="image folders (data=imagefolder), one study each plus a summary")
    parser.add_argument("--sizes", nargs="+", default=["10", "full"], help="examples per class, or 'full'")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sweeps", nargs="+", default=list(SWEEPS), choices=SWEEPS)
    parser.add_argument("--policies", nargs="+", default=[*PRESETS, "auto"], choices=[*PRESETS, "auto"])
    parser.add_argument("--collect-only", action="store_true", help="only rebuild the report from OUT")
    args = parser.parse_args(argv)
    for size in args.sizes:
        if size != "full" and not (size.isdigit() and int(size) > 0):
            parser.error(f"--sizes {size}: a positive number of examples per class, or full")
    for seed in args.seeds:
        if not 0 <= seed < 2**32:
            parser.error(f"--seeds {seed}: seeds are integers from 0 to 2**32 - 1")
    names = [d.name for d in args.datasets]
    for d in args.datasets:  # before hours of runs, not at the third dataset
        if not args.collect_only and not d.is_dir():
            parser.error(f"--datasets {d}: not a folder (an image folder: DIR/<class>/*.png or DIR/train|val|test/)")
        if names.count(d.name) > 1:
            parser.error(f"--datasets: two folders named {d.name!r} would share {args.out / d.name}: rename one")
        out, data = args.out.expanduser().resolve(), d.expanduser().resolve()
        if out == data or data in out.parents:  # found by a hostile tester: the runs' folder became a class
            parser.error(f"--out {args.out} lies inside --datasets {d}: its run folders would be read as a class "
                         "of images; choose an --out outside the datasets")
    sys.path.insert(0, str(HERE.parent))
    auto_keys = [o for o in overrides if o.lstrip("+~").startswith("scenario")]
    if auto_keys and (set(args.policies) != {"auto"} or set(args.sweeps) - {"transfer"}):
        parser.error(f"{auto_keys[0]}: the scenario is the study's to set per run; auto's own keys "
                     "(scenario.budget_minutes, ...) apply with --policies auto --sweeps transfer only")
    if overrides:  # a typo in a key or a group option: tl.train's one line, before any run
        from tl.cli import check_group_choices, check_override_keys

        check_group_choices(overrides)
        check_override_keys(overrides, "train")
    studies = {d.name: (args.out / d.name, [*overrides, "data=imagefolder", f"data.root={d}"])
               for d in args.datasets} or {"": (args.out, overrides)}
    if not args.collect_only:  # the overrides' values too, as tl.train checks them, before any folder or run
        from tl.checks import validate
        from tl.config import compose_config
        from tl.errors import TLError

        try:
            for _, extra in studies.values():
                validate(compose_config([*extra, f"scenario={base_scenario(extra)}"]), final=False)
        except TLError as e:
            fail(str(e))
    blocked = any(p.exists() and not p.is_dir() for p in args.out.parents)  # a file in the way: said below
    if args.collect_only and not args.out.exists() and not blocked:  # nothing to rebuild a report from
        fail(f"--out {args.out}: no such folder, so no runs to collect: give the --out of an earlier study", code=1)
    try:
        run_studies(args, studies)
    except subprocess.CalledProcessError as e:  # the run printed its own one-line error above
        fail(f"a run failed (exit {e.returncode}): {' '.join(map(str, e.cmd))}", code=1)
    except OSError as e:
        where = str(e.filename or "")
        fix = " (choose a writable --out)" if where.startswith(str(args.out)) else ""
        fail(f"{e.strerror or e}: {where}{fix}")


def run_studies(args: argparse.Namespace, studies: dict) -> None:
    from tl.errors import TLError

    per_dataset = {}
    for name, (out, extra) in studies.items():
        out.mkdir(parents=True, exist_ok=True)
        if not args.collect_only:
            try:
                run_sweeps(out, args.sizes, args.seeds, extra, args.sweeps, args.policies)
            except TLError as e:  # raised in this process (the probe sweep, in-process)
                fail(str(e))
        rows = collect(out)
        if not rows:
            fail(f"no results under {out}/*/*/results.json or {out}/*-probe.json", code=1)
        print(report(out, rows, name))
        print(f"wrote {out / 'study.md'}, {out / 'study.csv'}, {out / 'study.png'}")
        per_dataset[name] = rows
    if args.datasets:
        print(summarize(args.out, per_dataset))
        print(f"wrote {args.out / 'summary.md'}, {args.out / 'summary.png'}")


if __name__ == "__main__":
    main()
