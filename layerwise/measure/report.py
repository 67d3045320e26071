"""``report.md`` and the PNG charts of ``layerwise bench --suite paper``, from ``suite.json`` alone.

Every ratio is computed here from the measured numbers in ``suite.json`` (tokens/s, bytes,
seconds), never stored and copied: the tests recompute each one from the JSON.
"""

from __future__ import annotations

import statistics
from pathlib import Path

MiB = 2**20
COMPONENTS = ("weights", "grads", "optimizer", "activations")
PRECISION_NAMES = {"fp32": "fp32", "bf16": "bf16 autocast"}


PHASES = ("method_hook", "forward", "backward", "optimizer", "other")
OVERHEAD_THRESHOLD = 85.0
#: The cost model's prediction should be within this fraction of the measured median step (docs/cost-model.md).
COST_MODEL_TOLERANCE = 0.15


def timings(run: dict) -> dict:
    """Equal-batch timing over the worker's run and its interleaved repeats: medians, min and max."""
    eb = run["equal_batch"]
    reps = [{"step_seconds": eb["step_seconds"], "tokens_per_s": eb["tokens_per_s"], "phases": eb["phases"]}] + list(run.get("repeats", []))
    steps = [r["step_seconds"] for r in reps]
    tps = [r["tokens_per_s"] for r in reps]
    return {"n": len(reps), "step_seconds": statistics.median(steps), "step_min": min(steps), "step_max": max(steps),
            "tokens_per_s": statistics.median(tps), "tokens_min": min(tps), "tokens_max": max(tps),
            "phases": {k: statistics.median([r["phases"][k] for r in reps]) for k in PHASES}}


def predicted_step(run: dict) -> float:
    """The cost model's step for the plans this method's timed steps ran (uncalibrated)."""
    return run["equal_batch"]["predicted"]["phases"]["total"]


def measured_peak(run: dict) -> int | None:
    m = run["equal_batch"].get("measured_peak") or {}
    return m.get("bytes") or None


def ratios(runs: dict) -> dict:
    """Per method (equal batch): throughput gain, measured and accounted memory saving over full, the cost model's
    predicted step against the measured median, ideal speedup and percent of it."""
    full = runs["full"]
    t_full = timings(full)
    out = {}
    for label, r in runs.items():
        eb, t = r["equal_batch"], timings(r)
        gain = t["tokens_per_s"] / t_full["tokens_per_s"]
        ideal = predicted_step(full) / predicted_step(r)
        mp, mp_full = measured_peak(r), measured_peak(full)
        out[label] = {"gain": gain, "saving": full["equal_batch"]["memory"]["total"] / eb["memory"]["total"],
                      "measured_saving": mp_full / mp if mp and mp_full else None, "ideal": ideal,
                      "percent": 100.0 * gain / ideal if ideal else None,
                      "predicted_step": predicted_step(r), "measured_step": t["step_seconds"],
                      "error": predicted_step(r) / t["step_seconds"] - 1.0}
    return out


def overheads(runs: dict, threshold: float) -> dict:
    """Methods under ``threshold`` percent of ideal: measured seconds per step (median over repeats) above the
    cost model, by phase; they add up to measured step minus predicted step."""
    r = ratios(runs)
    out = {}
    for label, run in runs.items():
        if r[label]["percent"] is None or r[label]["percent"] >= threshold:
            continue
        eb, t = run["equal_batch"], timings(run)
        pred = eb["predicted"]["phases"]
        expected = {k: pred.get(k, 0.0) for k in PHASES}
        excess = {k: t["phases"][k] - v for k, v in expected.items()}
        out[label] = {"step_seconds": sum(t["phases"].values()), "ideal_step_seconds": sum(expected.values()), "excess": excess,
                      "percent": r[label]["percent"], "switches": switch_cost(eb.get("steps") or []),
                      "machine_speed": machine_speed(run, runs["full"])}
    return out


def machine_speed(run: dict, full: dict) -> float | None:
    """The machine's GEMM rate around this worker's timed window (mean of before and after) over the
    same around full's: below 1, the cores were slower (shared) while this method was timed."""
    a, b = run["equal_batch"].get("machine_gemm_flops_per_s"), full["equal_batch"].get("machine_gemm_flops_per_s")
    if not a or not b:
        return None
    return (sum(a) / len(a)) / (sum(b) / len(b))


def switch_cost(steps: list[dict]) -> dict | None:
    """What plan switches cost, measured: each timed step that starts a new plan against the mean of
    the steady steps (no switch) that ran the same plan; the extra seconds, in total and by phase,
    spread over all timed steps (so it compares with the per-step excess)."""
    if not steps:
        return None
    steady: dict[str, list[dict]] = {}
    for r in steps:
        if not r.get("switch"):
            steady.setdefault(r["plan"], []).append(r)
    extra = dict.fromkeys(("seconds",) + PHASES, 0.0)
    counted = 0
    for r in steps:
        same = steady.get(r["plan"])
        if not r.get("switch") or not same:
            continue
        counted += 1
        for k in extra:
            extra[k] += r[k] - sum(x[k] for x in same) / len(same)
    n = sum(1 for r in steps if r.get("switch"))
    return {"switch_steps": n, "compared": counted, "timed_steps": len(steps),
            "per_step": {k: v / len(steps) for k, v in extra.items()}}


def write_docs(report: dict, out: Path, docs: Path) -> None:
    """``docs`` (e.g. docs/benchmarks.md): the report as a documentation page, every chart and raw-file
    link rewritten relative to the page's folder; written to a temporary file, then renamed."""
    import os
    import re

    rel = Path(os.path.relpath(out.resolve(), docs.resolve().parent))
    body = render(report, out)
    body = re.sub(r"\]\(([^)/]+\.png)\)", lambda m: f"]({(rel / m.group(1)).as_posix()})", body)
    head = [
        "# Benchmarks",
        "",
        "<!-- Generated: do not edit by hand. -->",
        f"This page is written by `{report['command']}` (the suite's full report, raw numbers in "
        f"[`{(rel / 'suite.json').as_posix()}`]({(rel / 'suite.json').as_posix()}), every measurement's own command in it)."
        + (" Single-method benches with their commands are in [bench-runs.md](bench-runs.md)."
           if (docs.parent / "bench-runs.md").exists() else ""),
        "",
    ]
    body = body.split("\n", 1)[1]  # the report's own title is replaced by the page's
    docs.parent.mkdir(parents=True, exist_ok=True)
    tmp = docs.with_name(docs.name + ".tmp")
    tmp.write_text("\n".join(head) + body)
    tmp.replace(docs)


def fmt(v, spec: str, missing: str = "n/a") -> str:
    return missing if v is None else format(v, spec)


def _metric(point: dict | None, metric: str) -> str:
    return "n/a" if not point else f"{point[metric]:.4f}"


def render(report: dict, out: Path) -> str:
    m = report["machine"]
    lines = [
        "# layerwise benchmark suite: the papers' comparisons, with the hardware limit beside each number",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']}, OMP_NUM_THREADS={m['omp_num_threads']}, "
        f"OMP_WAIT_POLICY={m['omp_wait_policy']}; load average (1 min) {m['load_average_start'][0]:.1f} at start, "
        f"{m['load_average_end'][0]:.1f} at end; {m['date']}; whole suite {report['wall_seconds']:.0f} s"
        f"{' (--quick: fewer steps and sizes)' if report['quick'] else ''}.",
        "",
        "Every method runs in its own process on the same data, seed and padded length; ratios are against `full` "
        "measured in the same invocation at the same precision (fp32 and bf16 autocast are never compared with each other). "
        "Raw numbers, per-step phase times and the command of every measurement: `suite.json` (and `results/`, `logs/`).",
        "",
        f"Timing: {report.get('repeats', 1)} run(s) per method, interleaved (every method once, then again); tokens/s and step "
        "times are medians over them (min-max in brackets), the first step of each run not timed. Dropout: on in every block "
        "for every method (`train.frozen_dropout: true`): `full` and the methods run the same regularisation, so no ratio "
        "contains the eval-mode speedup of frozen blocks (docs/bench-runs.md measures that apart, with its accuracy effect). "
        "SmolLM2's config has dropout 0: unaffected either way.",
        "",
        "- **Measured peak** (the headline memory figure): the process's peak above its memory once the model was loaded, "
        "over the training window (RSS on CPU, `max_memory_allocated` on CUDA); **measured saving x** = full's / the method's. "
        "**Accounted** memory is layerwise's meter: weights + gradients + optimizer state + bytes saved for backward, each at "
        "its peak (summary.json `memory.total`), kept as a breakdown.",
        "- **Cost model** (docs/cost-model.md): the step time predicted for what the timed steps trained and ran, from profiled "
        "full fine-tuning steps ("
        + ("one per repeat round, shared by every method (`--quick`)" if report.get("quick") else "one in its own process right before every timed run")
        + "; every method's prediction takes the median of "
        "each measured time over all the profiles of its model and precision: per-block forward with and "
        "without a graph and backward, head with and without its weight gradient, clipping, AdamW and zero_grad per parameter) "
        "and the method's own block factors (adapters, recomputation, importance-loop forwards); "
        "**not calibrated** on any measured run. **pred / meas** compares it with the measured median step; "
        f"within {100 * report.get('cost_model_tolerance', 0.15):.0f}% is marked yes. **ideal x** = full's predicted step / "
        "the method's; **% of ideal** = measured gain / ideal x. "
        f"Under {report['threshold_percent_of_ideal']:.0f}%, the list below the table names the measured excess by phase.",
        "",
    ]
    for prec, why in report.get("skipped_precisions", {}).items():
        lines += [f"**{PRECISION_NAMES[prec]}**: {why}.", ""]
    for model, entry in report["models"].items():
        lines += _model_section(model, entry, report, out)
    if report.get("scaling"):
        lines += _scaling_section(report["scaling"], out)
    return "\n".join(lines) + "\n"


def _model_section(model: str, entry: dict, report: dict, out: Path) -> list[str]:
    precs = list(entry["runs"])
    first = next(iter(entry["runs"][precs[0]].values()))
    lines = [
        f"## {model} on {entry['data']} ({first['task']}, {entry['num_blocks']} blocks)",
        "",
        f"Batch {entry['batch_size']} x {entry['seq_len']} tokens (padded), step budget {entry['steps']} steps "
        f"(the first step is not timed), constant learning rate; held-out {first['metric']} on {entry['eval_samples']} examples.",
        "",
    ]
    for label, need in entry.get("partial_passes", {}).items():
        lines += [f"**Partial schedule**: one pass of `{label}` over the {entry['num_blocks']} blocks takes {need} steps, more than "
                  f"the step budget: its rows time only the blocks it reached.", ""]
    for prec in precs:
        runs = entry["runs"][prec]
        r = ratios(runs)
        lines += [
            f"### Equal batch, {PRECISION_NAMES[prec]}",
            "",
            "| method | trainable params (max) | tokens/s | throughput gain x | measured peak (MiB) | measured saving x "
            "| accounted (MiB) | accounted saving x | step s measured | step s predicted | pred / meas | within tolerance "
            "| ideal x (cost model) | % of ideal |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        tol = report.get("cost_model_tolerance", 0.15)
        for label, run in runs.items():
            eb, t, x = run["equal_batch"], timings(run), r[label]
            mp = measured_peak(run)
            lines.append(f"| {label} | {eb['trainable_parameters_max']:,} | {t['tokens_per_s']:.1f} [{t['tokens_min']:.1f}-{t['tokens_max']:.1f}] | "
                         f"{x['gain']:.2f} | {fmt(mp / MiB if mp else None, '.1f')} | {fmt(x['measured_saving'], '.2f')} | "
                         f"{eb['memory']['total'] / MiB:.1f} | {x['saving']:.2f} | {t['step_seconds']:.4f} | {x['predicted_step']:.4f} | "
                         f"{x['predicted_step'] / x['measured_step']:.2f} | {'yes' if abs(x['error']) <= tol else 'no'} | "
                         f"{fmt(x['ideal'], '.2f')} | {fmt(x['percent'], '.0f')} |")
        within = sum(abs(x["error"]) <= tol for x in r.values())
        lines += ["", f"Cost model within {100 * tol:.0f}% of the measured median step: {within} of {len(r)} methods "
                  f"(largest miss: {max(r, key=lambda k: abs(r[k]['error']))} {100 * max(abs(x['error']) for x in r.values()):.0f}%)."]
        lines += ["", _phase_table(runs), ""]
        over = overheads(runs, report["threshold_percent_of_ideal"])
        if over:
            lines += [f"Under {report['threshold_percent_of_ideal']:.0f}% of ideal, measured seconds per step (median phases over "
                      "the repeats) above the cost model's prediction, by phase:", ""]
            for label, o in over.items():
                parts = sorted(o["excess"].items(), key=lambda kv: -kv[1])
                named = [f"{k} +{v:.4f} s" for k, v in parts if v > 0.01 * o["step_seconds"]]
                sw = o["switches"]
                if sw and sw["compared"]:
                    ps = sw["per_step"]
                    top = max(PHASES, key=lambda k: ps[k])
                    named.append(f"of which plan switches ({sw['switch_steps']} of {sw['timed_steps']} timed steps start a new plan; "
                                 f"measured against steady steps of the same plan) {ps['seconds']:+.4f} s per step, mostly {top} "
                                 f"{ps[top]:+.4f} s" + (" (optimizer state allocated for the newly active parameters)" if top == "optimizer" else ""))
                if o["machine_speed"] is not None:
                    named.append(f"machine GEMM rate around this worker's timed steps {100 * o['machine_speed']:.0f}% of that around full's")
                lines.append(f"- **{label}** ({o['percent']:.0f}% of ideal): step "
                             f"{o['step_seconds']:.4f} s measured vs {o['ideal_step_seconds']:.4f} s ideal; " + "; ".join(named))
            lines.append("")
    lines += [f"![equal batch]({_chart_equal_batch(model, entry, out)})", "", f"![memory breakdown]({_chart_memory(model, entry, out)})", ""]
    lines += _equal_memory(model, entry, out) + _quality(model, entry, out)
    return lines


def _phase_table(runs: dict) -> str:
    rows = ["| method | method hook s | forward s | backward s | optimizer s | other s | step s (measured) | cost model hook / fwd / bwd / opt / other s "
            "| GFLOP per step (counted) | achieved GFLOP/s | % of matrix rate |",
            "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    rate = None
    for label, run in runs.items():
        eb, t = run["equal_batch"], timings(run)
        ph, pr = t["phases"], eb["predicted"]["phases"]
        fl = eb.get("flops") or {}
        achieved = fl.get("achieved_flops_per_s")
        rate = rate or (fl.get("matrix_rate") or {})
        peak = rate.get("flops_per_s")
        rows.append(f"| {label} | {ph['method_hook']:.4f} | {ph['forward']:.4f} | {ph['backward']:.4f} | {ph['optimizer']:.4f} | "
                    f"{ph['other']:.4f} | {t['step_seconds']:.4f} | "
                    + " / ".join(f"{pr[k]:.4f}" for k in PHASES) + " | "
                    f"{fmt(fl['flops'] / 1e9 if fl else None, '.2f')} | {fmt(achieved / 1e9 if achieved else None, '.1f')} | "
                    f"{fmt(100 * achieved / peak if achieved and peak else None, '.1f')} |")
    clock = next(iter(runs.values()))["equal_batch"].get("clock", "perf_counter")
    rate_line = (f" The matrix rate is measured on this device: {rate['flops_per_s'] / 1e9:.1f} GFLOP/s for a {rate['gemm']} GEMM."
                 if rate and rate.get("flops_per_s") else "")
    return ("Where the time goes (seconds per timed step, medians over the repeats, timed with "
            + ("CUDA events" if clock == "cuda_events" else "the host clock")
            + "; backward includes gradient clipping, other is data, plan switches and zero_grad). FLOPs are counted by "
            "torch's FlopCounterMode over one more step on the first timed step's plan (forward, backward and any recomputation); "
            "achieved GFLOP/s divides them by the measured time of the timed steps that ran that plan." + rate_line + "\n\n" + "\n".join(rows))


def _equal_memory(model: str, entry: dict, out: Path) -> list[str]:
    lines = []
    for prec, runs in entry["runs"].items():
        full = runs["full"]["equal_memory"]
        lines += [
            f"### Throughput at equal memory, {PRECISION_NAMES[prec]}",
            "",
            f"Budget {full['budget_bytes'] / MiB:.1f} MiB: what `full` needs at batch {entry['budget_batch']} (layerwise plan's prediction). "
            "Largest batch per method predicted by `layerwise plan` (activations affine in the batch, from two real steps), "
            "capped at the suite's batch cap; tokens/s and training memory measured at that batch over the step budget "
            "(a switching method over its whole schedule; the first step not timed).",
            "",
            "| method | largest batch (predicted) | batch run | measured training memory (MiB) | % of budget | tokens/s | throughput gain x |",
            "|---|---:|---:|---:|---|---:|---:|",
        ]
        ftps = full.get("tokens_per_s")
        for label, run in runs.items():
            em = run["equal_memory"]
            if em["batch_size"] < 1:
                lines.append(f"| {label} | 0 | - | - | does not fit | - | - |")
                continue
            cap = " (capped)" if em["capped"] else ""
            lines.append(f"| {label} | {em['max_batch_predicted']} | {em['batch_size']}{cap} | {em['memory']['total'] / MiB:.1f} | "
                         f"{100 * em['memory']['total'] / em['budget_bytes']:.1f} | "
                         f"{em['tokens_per_s']:.1f} | {fmt(em['tokens_per_s'] / ftps if ftps else None, '.2f')} |")
        lines.append("")
    lines += [f"![equal memory]({_chart_equal_memory(model, entry, out)})", ""]
    return lines


def _quality(model: str, entry: dict, out: Path) -> list[str]:
    lines = []
    for prec, runs in entry["runs"].items():
        q0 = runs["full"]["quality"]
        metric = q0["metric"]
        budget = entry["time_budget_s"][prec]
        lines += [
            f"### Quality after {q0['step_budget']} steps and after {budget:.1f} s of training, {PRECISION_NAMES[prec]}",
            "",
            f"The time budget is `full`'s training time for the step budget; faster methods keep training until it is spent "
            f"(evaluated at the first step past it) or until {entry.get('max_steps', 'the cap of')} steps (marked cap). "
            f"Held-out {metric} ({'higher' if metric == 'accuracy' else 'lower'} is better).",
            "",
            f"| method | {metric} before | {metric} after {q0['step_budget']} steps | training s for them | {metric} after {budget:.1f} s | steps in that time |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for label, run in runs.items():
            q = run["quality"]
            s, t = q["at_steps"], q["at_time"]
            lines.append(f"| {label} | {_metric(q['points'][0], metric)} | {_metric(s, metric)} | {s['seconds']:.1f} | {_metric(t, metric)} | "
                         f"{t['step']}{' (cap)' if t.get('capped') else ''} |")
        lines.append("")
    lines += [f"![quality vs seconds]({_chart_quality(model, entry, out)})", ""]
    return lines


def _scaling_section(sc: dict, out: Path) -> list[str]:
    units = {"depth": ("block", "ms per block", "MiB per block"), "seq_len": ("token", "ms per token of length", "MiB per token of length"),
             "batch": ("example", "ms per example", "MiB per example")}
    lines = [
        "## Scaling: step time and training memory vs depth, sequence length and batch",
        "",
        f"Tiny random models ({sc['family']}); base point: {sc['base']['depth']} blocks, length {sc['base']['seq_len']}, "
        f"batch {sc['base']['batch']}; one axis varied at a time. Step time is the median of the timed steps (LIFT: one step "
        "per phase, spread over the whole schedule). Slopes are least-squares fits.",
        "",
        "| method | " + " | ".join(f"{units[a][1]} | {units[a][2]}" for a in sc["axes"]) + " |",
        "|---|" + "---:|---:|" * len(sc["axes"]),
    ]
    for name, res in sc["methods"].items():
        cells = []
        for a in sc["axes"]:
            cells += [f"{1000 * res[a]['slope_seconds']:.3f}", f"{res[a]['slope_bytes'] / MiB:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"![scaling]({_chart_scaling(sc, out)})", ""]
    return lines


# ------------------------------------------------------------------------------------------------
# Charts: matplotlib's object API on an Agg canvas (no global backend change).


def _figure(rows: int, cols: int, w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    axes = [[fig.add_subplot(rows, cols, r * cols + c + 1) for c in range(cols)] for r in range(rows)]
    return fig, axes


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name)
    return name


def _per_precision(model: str, entry: dict, out: Path, name: str, draw) -> str:
    """One panel per precision: ``draw(ax, prec, runs)`` fills it; the figure is saved as ``name-model.png``."""
    precs = list(entry["runs"])
    fig, axes = _figure(1, len(precs), 6.5 * len(precs), 4.5)
    for ax, prec in zip(axes[0], precs):
        title, ylabel, ticks = draw(ax, prec, entry["runs"][prec])
        if ticks:
            ax.set_xticks(range(len(ticks)), ticks, rotation=45, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{model}, {title}, {PRECISION_NAMES[prec]}")
        ax.legend(fontsize=7, ncol=2 if name == "quality" else 1)
        ax.grid(True, axis="both" if name == "quality" else "y", alpha=0.3)
    return _save(fig, out, f"{name}-{model}.png")


def _chart_equal_batch(model: str, entry: dict, out: Path) -> str:
    def draw(ax, prec, runs):
        r = ratios(runs)
        labels = list(r)
        x = range(len(labels))
        ax.bar([i - 0.27 for i in x], [r[k]["gain"] for k in labels], 0.27, label="throughput gain x")
        ax.bar(list(x), [r[k]["ideal"] or 0 for k in labels], 0.27, label="ideal x (cost model)", alpha=0.6)
        ax.bar([i + 0.27 for i in x], [r[k]["saving"] for k in labels], 0.27, label="memory saving x")
        ax.axhline(1.0, color="black", lw=0.8)
        return "equal batch", "x over full", labels

    return _per_precision(model, entry, out, "equal_batch", draw)


def _chart_memory(model: str, entry: dict, out: Path) -> str:
    def draw(ax, prec, runs):
        labels = list(runs)
        bottom = [0.0] * len(labels)
        for comp in COMPONENTS:
            vals = [runs[k]["equal_batch"]["memory"][comp] / MiB for k in labels]
            ax.bar(labels, vals, bottom=bottom, label=comp)
            bottom = [b + v for b, v in zip(bottom, vals)]
        return "training memory at equal batch", "MiB (each component at its peak)", labels

    return _per_precision(model, entry, out, "memory", draw)


def _chart_equal_memory(model: str, entry: dict, out: Path) -> str:
    def draw(ax, prec, runs):
        labels = [k for k in runs if runs[k]["equal_memory"]["batch_size"] >= 1]
        bars = ax.bar(labels, [runs[k]["equal_memory"]["tokens_per_s"] for k in labels], label="tokens/s (bN: batch)")
        for b, k in zip(bars, labels):
            ax.annotate(f"b{runs[k]['equal_memory']['batch_size']}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
        return f"equal memory ({runs['full']['equal_memory']['budget_bytes'] / MiB:.0f} MiB)", "tokens/s at the largest batch within budget", labels

    return _per_precision(model, entry, out, "equal_memory", draw)


def _chart_quality(model: str, entry: dict, out: Path) -> str:
    def draw(ax, prec, runs):
        metric = runs["full"]["quality"]["metric"]
        for label, run in runs.items():
            pts = run["quality"]["points"]
            ax.plot([p["seconds"] for p in pts], [p[metric] for p in pts], marker="o", ms=3, label=label)
        ax.axvline(entry["time_budget_s"][prec], color="black", ls="--", lw=0.8, label="time budget")
        ax.set_xlabel("training seconds (evaluation not counted)")
        return "quality vs time", f"held-out {metric}", None

    return _per_precision(model, entry, out, "quality", draw)


def _chart_scaling(sc: dict, out: Path) -> str:
    axes_names = sc["axes"]
    fig, axes = _figure(2, len(axes_names), 4.5 * len(axes_names), 7)
    for c, axis in enumerate(axes_names):
        for name, res in sc["methods"].items():
            pts = res[axis]["points"]
            xs = [p["x"] for p in pts]
            axes[0][c].plot(xs, [1000 * p["step_seconds"] for p in pts], marker="o", ms=3, label=name)
            axes[1][c].plot(xs, [p["memory"]["total"] / MiB for p in pts], marker="o", ms=3, label=name)
        axes[0][c].set_ylabel("step ms")
        axes[1][c].set_ylabel("training memory MiB")
        for r in (0, 1):
            axes[r][c].set_xlabel({"depth": "blocks", "seq_len": "sequence length", "batch": "batch"}[axis])
            axes[r][c].grid(True, alpha=0.3)
            axes[r][c].legend(fontsize=7)
    return _save(fig, out, "scaling.png")
