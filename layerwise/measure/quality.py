"""Quality with error bars (docs/quality.md): the runs of ``layerwise bench`` folders (one folder per seed, or one
folder holding a learning-rate screen) put together per entry: the learning rate and seed each run used (from its own
resolved config), the held-out metric's mean and standard deviation over the runs, the median tokens/s and measured
peak memory above the loaded model, and their ratios to ``full``."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

import yaml

from layerwise.errors import ConfigError

#: Held-out metrics where lower is better.
LOWER_IS_BETTER = {"loss"}


def read_runs(folders: list[str]) -> list[dict]:
    """One record per finished run (``runs/LABEL-REPEAT/summary.json``) of the bench ``folders``."""
    found = []
    for folder in folders:
        summaries = sorted((Path(folder) / "runs").glob("*/summary.json"))
        if not summaries:
            raise ConfigError(f"'{folder}' holds no finished bench run (runs/*/summary.json): pass a `layerwise bench --output` folder")
        for path in summaries:
            summary = json.loads(path.read_text())
            train = yaml.safe_load((path.parent / "config.yaml").read_text())["train"]
            found.append({
                "label": path.parent.name.rsplit("-", 1)[0],
                "method": summary["method"],
                "lr": train["lr"],
                "seed": train["seed"],
                "frozen_dropout": train["frozen_dropout"],
                "eval": summary["eval"],
                "tokens_per_s": summary["tokens_per_s"],
                "measured_peak": summary["memory"]["measured_peak"],
                "train_seconds": summary["train_seconds"],
                # The method's work before its first step (salf's probe) counts in its end-to-end time.
                "seconds": summary["train_seconds"] + summary.get("setup_seconds", 0.0),
                "steps": summary["steps"],
                "folder": str(folder),
            })
    return found


def summarise(folders: list[str], metrics: list[str]) -> dict:
    """Per entry (bench label): each metric over its runs and the median speed and memory; ratios to ``full``. The
    first metric ranks each method's entries (``best_per_method``)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in read_runs(folders):
        missing = [m for m in metrics if m not in (run["eval"] or {})]
        if missing:
            raise ConfigError(f"run {run['label']} in {run['folder']} has no held-out '{missing[0]}': bench with --eval N (and a metric the task reports)")
        groups[run["label"]].append(run)
    entries = []
    for label, runs in groups.items():
        lrs = {r["lr"] for r in runs}
        if len(lrs) > 1:
            raise ConfigError(f"entry {label} ran at several learning rates ({sorted(lrs)}): give each lr its own bench label")
        scores = {}
        for metric in metrics:
            values = [r["eval"][metric] for r in runs]
            scores[metric] = {"values": values, "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}
        entries.append({
            "label": label,
            "method": runs[0]["method"],
            "lr": lrs.pop(),
            "seeds": [r["seed"] for r in runs],
            "frozen_dropout": sorted({r["frozen_dropout"] for r in runs}),
            "metrics": scores,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "measured_peak": statistics.median(r["measured_peak"] for r in runs),
            "train_seconds": statistics.median(r["train_seconds"] for r in runs),
            "seconds": statistics.median(r["seconds"] for r in runs),
            "steps": runs[0]["steps"],
        })
    full = next((e for e in entries if e["label"] == "full"), None)
    for e in entries:
        e["tokens_per_s_x_full"] = e["tokens_per_s"] / full["tokens_per_s"] if full else None
        e["memory_saving_x"] = full["measured_peak"] / e["measured_peak"] if full else None
    sign = 1 if metrics[0] in LOWER_IS_BETTER else -1
    best = {}
    for e in sorted(entries, key=lambda e: sign * e["metrics"][metrics[0]]["mean"]):
        best.setdefault(e["method"], e["label"])
    return {"metrics": metrics, "folders": [str(f) for f in folders], "entries": entries, "best_per_method": best}


def markdown(summary: dict) -> str:
    metrics = summary["metrics"]
    lines = [
        "| entry | method | lr | runs (seeds) | steps | "
        + " | ".join(f"held-out {m}: mean ± sd | each run" for m in metrics)
        + " | tokens/s (median) | x full | measured peak MiB (median) | saving x | setup + training s (median) |",
        "|---|---|---:|---|---:|" + "---|---|" * len(metrics) + "---:|---:|---:|---:|---:|",
    ]
    # Mark each method's best entry where a method has several (a screen).
    per_method: dict[str, int] = defaultdict(int)
    for e in summary["entries"]:
        per_method[e["method"]] += 1
    best = {label for method, label in summary["best_per_method"].items() if per_method[method] > 1}

    def ratio(x: float | None) -> str:
        return "" if x is None else f"{x:.2f}"

    def score(s: dict) -> str:
        spread = f"{s['mean']:.4f} ± {s['std']:.4f}" if s["std"] is not None else f"{s['mean']:.4f}"
        return f"{spread} | {', '.join(f'{v:.4f}' for v in s['values'])}"

    for e in summary["entries"]:
        lines.append(
            f"| {e['label']}{' **(best)**' if e['label'] in best else ''} | {e['method']} | {e['lr']:g} | "
            f"{len(e['seeds'])} ({', '.join(map(str, e['seeds']))}) | {e['steps']} | "
            + " | ".join(score(e["metrics"][m]) for m in metrics)
            + f" | {e['tokens_per_s']:.0f} | {ratio(e['tokens_per_s_x_full'])} | {e['measured_peak'] / 2**20:.0f} | "
            f"{ratio(e['memory_saving_x'])} | {e['seconds']:.1f} |"
        )
    if best:
        lines += ["", *screen_lines(summary)]
    return "\n".join(lines) + "\n"


def screen_lines(summary: dict) -> list[str]:
    """A screen at a glance: each method's lrs in order with the first metric's mean, and the best."""
    metric = summary["metrics"][0]
    by_method: dict[str, list[dict]] = defaultdict(list)
    for e in summary["entries"]:
        by_method[e["method"]].append(e)
    lines = [f"| method | held-out {metric} at each lr | best lr |", "|---|---|---:|"]
    for method in sorted(by_method, key=lambda m: (m != "full", m)):
        tried = " · ".join(f"{e['lr']:g}: {e['metrics'][metric]['mean']:.4f}" for e in sorted(by_method[method], key=lambda e: e["lr"]))
        chosen = next(e["lr"] for e in by_method[method] if e["label"] == summary["best_per_method"][method])
        lines.append(f"| {method} | {tried} | {chosen:g} |")
    return lines


def write_report(folders: list[str], metrics: list[str], output: str) -> Path:
    """``OUTPUT.json`` (every run's figures and the summary) and ``OUTPUT.md`` (the table)."""
    summary = summarise(folders, metrics)
    out = Path(output).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(summary))
    return out


def default_lrs(screens: list[dict]) -> dict[str, float]:
    """Each method's default lr from its screens (``summarise`` of one bench per model): among the lrs every screen
    tried for the method, the one whose shortfall from each screen's best, relative to that best
    (``|mean - best| / |best|`` of the screen's first metric), summed over the screens is smallest; ties go to the
    smaller lr. Relative shortfalls put an accuracy and a loss on one scale, and a tie among noisy near-equal values
    on one model does not outvote a clear difference on the other (as summed ranks would)."""
    per_screen: dict[str, list[tuple[int, dict[float, float]]]] = defaultdict(list)
    for screen in screens:
        metric = screen["metrics"][0]
        scores: dict[str, dict[float, float]] = defaultdict(dict)
        for e in screen["entries"]:
            scores[e["method"]][e["lr"]] = e["metrics"][metric]["mean"]
        for method, by_lr in scores.items():
            per_screen[method].append((1 if metric in LOWER_IS_BETTER else -1, by_lr))
    chosen = {}
    for method, screens_of_method in per_screen.items():
        common = sorted(set.intersection(*(set(by_lr) for _, by_lr in screens_of_method)))
        shortfall = dict.fromkeys(common, 0.0)
        for sign, by_lr in screens_of_method:
            best = min((sign * by_lr[lr] for lr in common)) * sign
            for lr in common:
                shortfall[lr] += abs(by_lr[lr] - best) / abs(best) if best else abs(by_lr[lr])
        chosen[method] = min(common, key=lambda lr: (shortfall[lr], lr))
    return chosen
