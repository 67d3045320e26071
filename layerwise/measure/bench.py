"""``layerwise bench``: methods side by side, each in its own subprocess, on identical data,
seed and padded length; ratios against ``full`` measured in the same invocation; the cost
model's ideal speedup printed beside each measurement.

Writes ``DIR/results.json`` (a list of per-method summaries with ratios), ``DIR/results.md``
and ``DIR/chart.png`` (measured peak memory above the loaded model vs tokens/s).
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from layerwise.config import resolve
from layerwise.errors import ConfigError
from layerwise.measure.peers import PEERS
from layerwise.measure.report import fmt
from layerwise.methods import METHODS
from layerwise.models import count_blocks
from layerwise.preflight import inside
from layerwise.schema import load_yaml

#: Accounted and measured memory further apart than this are named in the report.
ACCOUNTED_TOLERANCE = 0.25


def method_raw(base: dict, name: str, steps: int, num_blocks: int, variant: dict | None = None) -> dict:
    """The config of one compared entry: ``base`` with the method's own keys (``method.*`` for the method they
    name, or the entry's ``methods.<label>.*`` variant), its stated defaults and a schedule that covers the stack."""
    raw = copy.deepcopy(base)
    method = raw.get("method") if isinstance(raw.get("method"), dict) else {}
    # Method-specific keys given for the bench apply only to the method they name.
    extra = {k: v for k, v in method.items() if k != "name"} if method.get("name") == name else {}
    if variant is not None:
        extra = {k: v for k, v in variant.items() if k != "name"}
        # `methods.<label>.train.<key>`: a training setting for this entry only (e.g. its own lr).
        own_train = extra.pop("train", None)
        if own_train is not None:
            if not isinstance(own_train, dict):
                raise ConfigError(f"methods.<label>.train must be a mapping of train keys, e.g. methods.lora.train.lr=1e-3; got {own_train!r}")
            raw.setdefault("train", {}).update(own_train)
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}': choose one of {', '.join(sorted(METHODS))} (--methods)")
    cls = METHODS[name]
    given = {**cls.stated_defaults(num_blocks, with_data=True, given=extra), **extra}
    raw["method"] = {"name": name, **cls.fit_schedule(num_blocks, steps, given), **given}
    return raw


def dropout_regime(results: list[dict]) -> str:
    """What the compared methods differ in besides the method, as far as dropout goes (stated in every report)."""
    on = {r["frozen_dropout"] for r in results}
    if on == {True}:
        return "on in every block for every method (train.frozen_dropout=true): the same regime on both sides of each ratio."
    if on == {False}:
        return ("blocks that do not train in a step run in eval mode (no dropout; train.frozen_dropout=false), so a method that "
                "freezes blocks also skips their dropout while `full` keeps it everywhere; rerun with "
                "--set train.frozen_dropout=true for the same regime on both sides.")
    return "differs between entries (train.frozen_dropout per entry): " + ", ".join(
        f"{r.get('label', r['method'])} {'on' if r['frozen_dropout'] else 'eval mode'}" for r in results) + "."


def check_whole_passes(label: str, settings: dict, steps: int, num_blocks: int) -> None:
    """Refuse to time a method that trains its blocks in turn on part of its schedule: the blocks it would
    never reach are the expensive ones (backward runs deepest there)."""
    need = METHODS[settings["name"]].pass_steps(num_blocks, settings)
    if need is not None and need > steps:
        raise ConfigError(
            f"{label}: one pass of its schedule over the {num_blocks} blocks takes {need} steps but --steps is {steps}, "
            f"so the blocks it reaches last would never be timed: use --steps {need} or more, or fewer steps per phase "
            f"(methods.{label}.switch_every)"
        )


def _run(cmd: list[str], log_path: Path) -> None:
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise ConfigError(f"bench step failed ({' '.join(cmd[3:5])}): {tail[0]} (full log: {log_path})")


def run_bench(args, base_raw: dict) -> list[dict]:
    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"bench output folder '{out}' already exists and is not empty: pass a new --output")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ConfigError("--methods is empty: name at least one method, e.g. --methods full,lift")
    if args.steps < 2:
        raise ConfigError("--steps must be at least 2 (the first step is warm-up and not timed)")
    base = copy.deepcopy(base_raw)
    base.pop("output", None)
    train = base.setdefault("train", {})
    train.update(
        {
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "eval_before": False,
            "eval_after": args.eval_samples > 0,
            "sample_generations": 0,
            "save_model": False,
            "checkpoint_at_end": False,
            "progress": False,
            "log_every": max(1, args.steps // 10),
        }
    )
    data = base.setdefault("data", {})
    data.update({"max_length": args.seq_len, "padding": "max_length"})
    if args.eval_samples > 0:
        data["max_eval_samples"] = args.eval_samples
    model_spec = base.get("model", "minilm")
    # `methods.<label>.<key>` (config or --set) configures one entry of --methods; with a
    # `name` key the label is a variant of that method (e.g. two freeze settings side by side).
    variants = base.pop("methods", None) or {}
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise ConfigError("methods: expected a mapping label -> method settings, e.g. --set methods.freeze.top=3")
    unknown = sorted(set(variants) - set(methods))
    if unknown:
        raise ConfigError(f"methods.{unknown[0]}: '{unknown[0]}' is not in --methods ({', '.join(methods)}): add it or drop the setting")
    # Validate every method's config before running anything.
    num_blocks = count_blocks(model_spec)
    raws = {}
    for label in methods:
        variant = variants.get(label)
        if label in PEERS and variant is None:
            # A peer runs its own library on this config; the method named here only fills the config (ignored).
            raws[label] = {**copy.deepcopy(base), "method": {"name": "full"}}
            resolve(raws[label])
            continue
        name = (variant or {}).get("name", label)
        raw = method_raw(base, name, args.steps, num_blocks, variant)
        resolve(raw)
        check_whole_passes(label, raw["method"], args.steps, num_blocks)
        raws[label] = raw
    peers = [label for label in methods if label in PEERS and label not in variants]
    ours = [label for label in methods if label not in peers]
    if "full" not in methods:
        print("note: 'full' is not among --methods; ratios are left empty", file=sys.stderr)

    out.mkdir(parents=True, exist_ok=True)
    (out / "configs").mkdir()
    (out / "runs").mkdir()
    for name, raw in raws.items():
        inside(out / "configs", f"{name}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    print(f"profiling per-block cost on {model_spec} (batch {args.batch_size} x {args.seq_len})", flush=True)
    prof_cmd = [sys.executable, "-m", "layerwise", "measure", "profile", str(out / "configs" / f"{(ours or methods)[0]}.yaml"),
                "--methods", ",".join(ours), "--steps", str(args.steps), "--output", str(out / "profile.json")]
    _run(prof_cmd, out / "runs" / "profile.log")
    profile = json.loads((out / "profile.json").read_text())

    load_start = os.getloadavg()
    per_method: dict[str, list[dict]] = {m: [] for m in methods}
    for rep in range(args.repeats):
        # Interleave methods within each repeat so drift in machine load hits all of them alike.
        for name in methods:
            run_dir = out / "runs" / f"{name}-{rep}"
            cmd = [sys.executable, "-m", "layerwise", "train", str(out / "configs" / f"{name}.yaml"), "--output", str(run_dir)]
            if name in peers:
                cmd = [sys.executable, "-m", "layerwise", "measure", "peer", str(out / "configs" / f"{name}.yaml"), "--peer", name,
                       "--output", str(run_dir)]
            own_cache = None
            if name not in peers and raws[name].get("train", {}).get("prefix_cache", "off") not in ("off", False) \
                    and not raws[name]["train"].get("prefix_cache_dir"):
                # Each run builds its own frozen-prefix cache, so every repeat's tokens/s includes the build
                # (a shared folder would let repeat 2 reuse repeat 1's cache).
                own_cache = out / "runs" / f"{name}-{rep}-prefix-cache"
                cmd += ["--set", f"train.prefix_cache_dir={own_cache}"]
            print(f"[{rep + 1}/{args.repeats}] {name} ...", end=" ", flush=True)
            _run(cmd, out / "runs" / f"{name}-{rep}.log")
            summary = json.loads((run_dir / "summary.json").read_text())
            per_method[name].append(summary)
            if own_cache is not None:
                shutil.rmtree(own_cache, ignore_errors=True)
            print(f"{summary['tokens_per_s']:.0f} tokens/s, peak training memory {summary['memory']['total'] / 2**20:.0f} MiB", flush=True)

    results = summarize(per_method, profile, raws, set(peers))
    command = "layerwise bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "layerwise bench"
    meta = {
        "command": command,
        "model": model_spec,
        "data": data.get("source", "rotten_tomatoes"),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "repeats": args.repeats,
        "profile": profile["profile"],
        # Shared machines are noisy: say how busy this one was, and how OpenMP threads waited
        # (busy-waiting threads slow down several-fold when other processes compete for the cores).
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "(default)"),
        "dropout_regime": dropout_regime(results),
    }
    write_results(out, meta, results)
    return results


def summarize(per_method: dict[str, list[dict]], profile: dict, raws: dict[str, dict], peers: set[str]) -> list[dict]:
    """Each entry's runs (summary.json of each repeat, in order) as one row: medians, the runs' spread, ratios to `full`;
    ``raws``: each entry's config, ``peers``: the entries run by a peer library."""
    results = []
    for name, runs in per_method.items():
        summary = dict(runs[-1])
        summary["tokens_per_s_runs"] = [r["tokens_per_s"] for r in runs]
        summary["tokens_per_s"] = statistics.median(summary["tokens_per_s_runs"])
        summary["samples_per_s"] = statistics.median(r["samples_per_s"] for r in runs)
        summary["peak_memory_bytes"] = int(statistics.median(r["peak_memory_bytes"] for r in runs))
        summary["measured_peak_runs"] = [r["memory"]["measured_peak"] for r in runs]
        summary["measured_peak"] = int(statistics.median(summary["measured_peak_runs"]))
        # What the meter accounts for beyond the weights (resident before the window), against the measured growth.
        accounted = summary["memory"]["total"] - summary["memory"]["weights"]
        summary["accounted_over_measured"] = accounted / summary["measured_peak"] if summary["measured_peak"] else None
        summary["predicted"] = profile["methods"].get(name)
        summary["label"] = name
        # A peer's plain loop keeps every block in train mode (dropout on everywhere).
        summary["frozen_dropout"] = name in peers or bool(raws[name].get("train", {}).get("frozen_dropout", False))
        results.append(summary)
    full = next((r for r in results if r["method"] == "full"), None)
    for r in results:
        if full is None:
            r.update(tokens_per_s_ratio=None, memory_ratio=None, memory_saving_x=None, process_memory_ratio=None,
                     measured_memory_saving_x=None)
            continue
        r["tokens_per_s_ratio"] = r["tokens_per_s"] / full["tokens_per_s"]
        r["memory_ratio"] = r["memory"]["total"] / full["memory"]["total"]
        r["memory_saving_x"] = full["memory"]["total"] / r["memory"]["total"]
        r["process_memory_ratio"] = r["peak_memory_bytes"] / full["peak_memory_bytes"]
        r["measured_memory_saving_x"] = full["measured_peak"] / r["measured_peak"] if r["measured_peak"] else None
        pred = r["predicted"] or {}
        r["percent_of_ideal"] = 100.0 * r["tokens_per_s_ratio"] / pred["predicted_speedup"] if pred.get("predicted_speedup") else None
    return results


def write_results(out: Path, meta: dict, results: list[dict]) -> None:
    """DIR/results.json, results.md and chart.png; prints the table."""
    meta.setdefault("device", next((r["device"] for r in results if r.get("device")), None))
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (out / "results.md").write_text(render_markdown(meta, results))
    chart(results, out / "chart.png", title=f"{meta['model']}, batch {meta['batch_size']} x {meta['seq_len']}")
    print((out / "results.md").read_text())


def bench_report(folder: str | Path, methods: list[str] | None = None) -> list[dict]:
    """Rebuild a bench folder's results from what its runs wrote (configs/, runs/NAME-REP/summary.json, profile.json):
    a bench that stopped before its report (a time limit), or repeats completed by hand (``layerwise train
    DIR/configs/NAME.yaml --output DIR/runs/NAME-REP``; a peer: ``layerwise measure peer ... --peer NAME``). Runs
    NAME-0, NAME-1, ... count up to the first one missing. A finished bench's order and command are kept."""
    out = Path(folder)
    prior = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None
    names = methods or ([r["label"] for r in prior["results"]] if prior else
                        sorted((p.stem for p in (out / "configs").glob("*.yaml")), key=lambda n: (n != "full", n)))
    if not names:
        raise ConfigError(f"bench-report: '{out}' has no configs/*.yaml: pass the --output folder of a `layerwise bench` run")
    missing = [n for n in names if not (out / "configs" / f"{n}.yaml").exists()]
    if missing:
        raise ConfigError(f"bench-report: no configs/{missing[0]}.yaml in '{out}': name entries of this bench in --methods")
    raws = {n: load_yaml(out / "configs" / f"{n}.yaml") for n in names}
    per_method = {}
    for name in names:
        runs = []
        while (out / "runs" / f"{name}-{len(runs)}" / "summary.json").exists():
            runs.append(json.loads((out / "runs" / f"{name}-{len(runs)}" / "summary.json").read_text()))
        if not runs:
            raise ConfigError(f"bench-report: no finished run of '{name}' in {out / 'runs'} (runs/{name}-0/summary.json): "
                              f"run it, or leave it out with --methods")
        per_method[name] = runs
    profile = json.loads((out / "profile.json").read_text()) if (out / "profile.json").exists() else {"profile": None, "methods": {}}
    # A peer's config names `full` as its method (bench fills it so); a variant labelled like a peer names its own.
    peers = {n for n in names if n in PEERS and raws[n].get("method", {}).get("name") == "full"}
    results = summarize(per_method, profile, raws, peers)
    first = raws[names[0]]
    counts = sorted({len(r) for r in per_method.values()})
    meta = {
        "command": f"layerwise measure bench-report {out}" + (f" --methods {','.join(methods)}" if methods else ""),
        "rebuilt_from_runs": True,
        **({"bench_command": prior["meta"]["command"]} if prior else {}),
        "model": first.get("model", "minilm"),
        "data": first.get("data", {}).get("source", "rotten_tomatoes"),
        "steps": first["train"]["max_steps"],
        "batch_size": first["train"]["batch_size"],
        "seq_len": first["data"]["max_length"],
        "repeats": counts[0] if len(counts) == 1 else f"{counts[0]}-{counts[-1]}",
        "runs_per_method": {n: len(r) for n, r in per_method.items()},
        "profile": profile["profile"],
        "dropout_regime": dropout_regime(results),
    }
    write_results(out, meta, results)
    return results


def render_markdown(meta: dict, results: list[dict]) -> str:
    lines = [
        f"# layerwise bench: {meta['model']} on {meta['data']}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Batch {meta['batch_size']} x {meta['seq_len']} tokens (padded), {meta['steps']} steps per method "
        f"(first step not timed), median of {meta['repeats']} run(s)"
        + (" (min-max in brackets)" if any(len(r.get("tokens_per_s_runs") or []) > 1 for r in results) else "")
        + ", each method in its own process" + (f" on {meta['device']}" if meta.get("device") not in (None, "cpu") else "") + ".",
        *(["Rebuilt from the runs' summaries" + (f" of `{meta['bench_command']}`" if meta.get("bench_command") else "")
           + ": runs per method " + ", ".join(f"{k} {v}" for k, v in meta["runs_per_method"].items()) + "."]
          if meta.get("rebuilt_from_runs") else []),
        f"Dropout: {meta['dropout_regime']}",
        *(
            [
                f"Load average (1 min) at start / end: {meta['load_average_start'][0]:.1f} / {meta['load_average_end'][0]:.1f} "
                f"on {meta['cpu_count']} CPUs; OMP_WAIT_POLICY={meta['omp_wait_policy']}."
            ]
            if "load_average_start" in meta
            else []
        ),
        "",
        "| method | tokens/s | x full | ideal x (cost model) | % of ideal | measured peak (MiB) | measured saving x "
        "| accounted peak (MiB) | accounted saving x | weights / grads / optimizer / activations (MiB) | process peak (MiB) "
        "| trainable params (max) | held-out |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    mib = lambda b: b / 2**20  # noqa: E731
    for r in results:
        m = r["memory"]
        pred = (r.get("predicted") or {}).get("predicted_speedup")
        ev = r.get("eval") or {}
        held = f"acc {ev['accuracy']:.4f}" if "accuracy" in ev else (f"loss {ev['loss']:.4f}" if "loss" in ev else "-")
        tps = r.get("tokens_per_s_runs") or []
        spread = f" ({min(tps):.0f}-{max(tps):.0f})" if len(tps) > 1 else ""
        lines.append(
            f"| {r.get('label', r['method'])} | {r['tokens_per_s']:.0f}{spread} | {fmt(r.get('tokens_per_s_ratio'), '.2f')} | {fmt(pred, '.2f')} | "
            f"{fmt(r.get('percent_of_ideal'), '.0f')} | {mib(r['measured_peak']):.1f} | {fmt(r.get('measured_memory_saving_x'), '.2f')} | "
            f"{mib(m['total']):.1f} | {fmt(r.get('memory_saving_x'), '.2f')} | "
            f"{mib(m['weights']):.1f} / {mib(m['grads']):.1f} / {mib(m['optimizer']):.1f} / {mib(m['activations']):.1f} | "
            f"{mib(r['peak_memory_bytes']):.0f} | {r['trainable_parameters_max']:,} | {held} |"
        )
    off = [f"{r.get('label', r['method'])} ({r['accounted_over_measured']:.2f}x)" for r in results
           if r.get("accounted_over_measured") and abs(r["accounted_over_measured"] - 1) > ACCOUNTED_TOLERANCE]
    lines += [
        "",
        "Measured peak = the process's peak memory above what it held when the first step began (the loaded model): "
        "peak RSS on CPU, `max_memory_allocated` on CUDA; median over the repeats. Accounted peak = weights + gradients + "
        "optimizer state + bytes saved for backward (each at its peak), counted by layerwise's meter; it leaves out "
        "working memory (recomputation, temporary buffers, the allocator's slack). Process peak: the whole process's peak RSS "
        "on CPU, `max_memory_allocated` with the model on CUDA. "
        "'ideal x' is the cost model's best tokens/s ratio over `full` at this batch, from per-block forward/backward times "
        "profiled on this machine (see docs/cost-model.md).",
        "",
        *([f"Accounted beyond the weights and measured differ by more than {ACCOUNTED_TOLERANCE:.0%} for: {', '.join(off)} "
           "(accounted / measured).", ""] if off else []),
    ]
    return "\n".join(lines)


def chart(results: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for r in results:
        x = r["measured_peak"] / 2**20
        y = r["tokens_per_s"]
        ax.scatter([x], [y], s=60)
        ax.annotate(r.get("label", r["method"]), (x, y), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("measured peak memory above the loaded model (MiB)")
    ax.set_ylabel("tokens/s")
    ax.set_title(title or "memory vs throughput")
    ax.grid(True, alpha=0.3)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
