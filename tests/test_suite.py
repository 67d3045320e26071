"""``layerwise bench --suite paper --quick`` on a tiny random model: report structure, charts, JSON,
and every ratio in the report recomputed from the measured numbers in suite.json."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

from layerwise.cli import main
from layerwise.preflight import CPU_BF16_ENV, cpu_has_bf16

METHODS = ["full", "lift_top_down", "salf", "ist", "meft"]
#: The suite's bf16 half runs only where the CPU has bf16 matrix units (the subprocess sees the same answer).
PRECISIONS = {"fp32": "fp32", "bf16": "bf16 autocast"} if cpu_has_bf16() else {"fp32": "fp32"}


def tables(md: str) -> dict[str, list[dict]]:
    """Markdown tables by the heading above them (the first table after it): rows as {header: cell}."""
    out: dict[str, list[dict]] = {}
    heading = None
    lines = md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#"):
            heading = line.lstrip("# ").strip()
        elif line.startswith("|") and heading and heading not in out and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            head = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(head, (c.strip() for c in row.strip("|").split("|")))))
            out[heading] = rows
    return out


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "report"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "layerwise", "bench", "--suite", "paper", "--quick", "--models", "tiny-llama",
           "--methods", ",".join(METHODS), "--repeats", "2", "--output", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out, json.loads((out / "suite.json").read_text()), (out / "report.md").read_text()


def test_report_structure_charts_and_json(suite):
    out, data, md = suite
    assert set(data) >= {"command", "machine", "methods", "precisions", "models", "scaling", "wall_seconds"}
    assert data["command"].startswith("layerwise bench --suite paper --quick")
    entry = data["models"]["tiny-llama"]
    assert set(entry["runs"]) == set(PRECISIONS) and set(entry["profiles"]) == set(PRECISIONS)
    if "bf16" not in PRECISIONS:
        assert data["skipped_precisions"]["bf16"].startswith("skipped: this CPU has no bf16 matrix units")
        assert f"**bf16 autocast**: {data['skipped_precisions']['bf16']}." in md and "### Equal batch, bf16" not in md
    for prec, runs in entry["runs"].items():
        assert list(runs) == METHODS
        for label, run in runs.items():
            assert run["precision"] == prec and run["command"].startswith("layerwise measure worker ")
            eb = run["equal_batch"]
            # Each component at its own peak: the total (peak of the per-step sums) is at most their sum.
            assert eb["tokens_per_s"] > 0 and 0 < eb["memory"]["total"] <= sum(eb["memory"][k] for k in ("weights", "grads", "optimizer", "activations"))
            assert set(eb["phases"]) == {"method_hook", "forward", "backward", "optimizer", "other"}
            assert eb["predicted"]["predicted_speedup"] > 0
            q = run["quality"]
            assert q["at_steps"]["step"] == entry["steps"] and q["points"][0]["step"] == 0
            assert q["at_time"]["seconds"] >= entry["time_budget_s"][prec] or q["at_time"]["step"] >= entry["steps"]
            em = run["equal_memory"]
            assert "budget_bytes" in em and em["batch_size"] >= 1
            # Equal memory is timed over the same steps as equal batch: LIFT over the same plans, its whole schedule.
            assert em["steps"] == eb["timed_steps"] and (em["plans"] == eb["plans"] or not label.startswith("lift"))
        assert runs["full"]["equal_memory"]["max_batch_predicted"] == entry["budget_batch"]
        # IST's importance loop (every 10 steps) ran inside the timed window and was measured as method hook time.
        assert runs["ist"]["equal_batch"]["phases"]["method_hook"] > 0
        assert runs["full"]["equal_batch"]["phases"]["method_hook"] < runs["ist"]["equal_batch"]["phases"]["method_hook"]
    for name in ("full", "lift", "lora", "meft"):
        sc = data["scaling"]["methods"][name]
        assert set(sc) >= {"depth", "seq_len", "batch", "command"}
    for heading in ("## tiny-llama on boolq", *(f"### Equal batch, {title}" for title in PRECISIONS.values()), "Where the time goes",
                    "### Throughput at equal memory, fp32", "### Quality after", "## Scaling"):
        assert heading in md, heading
    charts = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert {"equal_batch-tiny-llama.png", "memory-tiny-llama.png", "equal_memory-tiny-llama.png", "quality-tiny-llama.png", "scaling.png"} <= set(charts)
    for name in charts:
        w, h = png_size(out / name)
        assert w > 300 and h > 200


def median_over_repeats(run: dict, key: str) -> float:
    """The worker's equal-batch figure and its timing repeats' (the report's median)."""
    values = sorted([run["equal_batch"][key]] + [r[key] for r in run.get("repeats", [])])
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def test_every_ratio_is_computed_from_measured_numbers(suite):
    _, data, md = suite
    t = tables(md)
    entry = data["models"]["tiny-llama"]
    checked = 0
    for prec, title in PRECISIONS.items():
        runs = entry["runs"][prec]
        full = runs["full"]["equal_batch"]
        rows = {r["method"]: r for r in t[f"Equal batch, {title}"]}
        assert list(rows) == METHODS
        full_run = runs["full"]
        # The cost model is not calibrated on any run: full's prediction over its steps is the full-step prediction.
        assert full["predicted"]["phases"]["total"] == pytest.approx(full["predicted"]["predicted_full_step_seconds"])
        for label, run in runs.items():
            eb, row = run["equal_batch"], rows[label]
            assert len(run["repeats"]) == data["repeats"] - 1 == 1 and run["repeats"][0]["plans"] == eb["plans"]
            gain = median_over_repeats(run, "tokens_per_s") / median_over_repeats(full_run, "tokens_per_s")
            pred = eb["predicted"]["phases"]
            assert pred["total"] == pytest.approx(sum(pred[k] for k in ("method_hook", "forward", "backward", "optimizer", "other")))
            ideal = full["predicted"]["phases"]["total"] / pred["total"]
            step = median_over_repeats(run, "step_seconds")
            assert row["tokens/s"].startswith(f"{median_over_repeats(run, 'tokens_per_s'):.1f} [")
            assert row["throughput gain x"] == f"{gain:.2f}"
            assert row["accounted saving x"] == f"{full['memory']['total'] / eb['memory']['total']:.2f}"
            assert row["accounted (MiB)"] == f"{eb['memory']['total'] / 2**20:.1f}"
            peak, full_peak = eb["measured_peak"]["bytes"], full["measured_peak"]["bytes"]
            assert row["measured peak (MiB)"] == f"{peak / 2**20:.1f}" and row["measured saving x"] == f"{full_peak / peak:.2f}"
            assert row["step s measured"] == f"{step:.4f}" and row["step s predicted"] == f"{pred['total']:.4f}"
            assert row["pred / meas"] == f"{pred['total'] / step:.2f}"
            assert row["within tolerance"] == ("yes" if abs(pred["total"] / step - 1) <= data["cost_model_tolerance"] else "no")
            assert row["ideal x (cost model)"] == f"{ideal:.2f}"
            assert row["% of ideal"] == f"{100 * gain / ideal:.0f}"
            assert row["trainable params (max)"] == f"{eb['trainable_parameters_max']:,}"
            checked += 6
            # Counted FLOPs and the rate the steps of that plan reached, against the measured matrix rate.
            fl = eb["flops"]
            same = [r["seconds"] for r in eb["steps"] if r["plan"] == fl["plan"]]
            assert fl["flops"] > 0 and len(same) == fl["timed_steps_with_plan"] and len(eb["steps"]) == eb["timed_steps"]
            if same:
                achieved = fl["flops"] / (sum(same) / len(same))
                assert abs(fl["achieved_flops_per_s"] - achieved) <= 1e-6 * achieved
                assert fl["matrix_rate"]["flops_per_s"] == entry["matrix_rate"][prec]["flops_per_s"] > 0
                cells = md.split(f"### Equal batch, {title}\n", 1)[1].split("\n### ", 1)[0]
                line = [x for x in cells.splitlines() if x.startswith(f"| {label} | ")][-1]  # the phase table follows the ratios
                assert f"| {fl['flops'] / 1e9:.2f} | {achieved / 1e9:.1f} | {100 * achieved / fl['matrix_rate']['flops_per_s']:.1f} |" in line
                checked += 2
            if 100 * gain / ideal < data["threshold_percent_of_ideal"]:
                # The report names the measured overhead of every method under the threshold.
                section = md.split(f"### Equal batch, {title}\n", 1)[1].split("\n### ", 1)[0]
                bullet = next(line for line in section.splitlines() if line.startswith(f"- **{label}** ("))
                assert f"({100 * gain / ideal:.0f}% of ideal)" in bullet and " s measured vs " in bullet
                rate = lambda e: sum(e["machine_gemm_flops_per_s"]) / 2  # noqa: E731 - before and after the timed steps
                assert f"machine GEMM rate around this worker's timed steps {100 * rate(eb) / rate(full):.0f}% of that around full's" in bullet
        mem_rows = {r["method"]: r for r in t[f"Throughput at equal memory, {title}"]}
        for label, run in runs.items():
            em, row = run["equal_memory"], mem_rows[label]
            assert row["% of budget"] == f"{100 * em['memory']['total'] / em['budget_bytes']:.1f}"
            assert row["throughput gain x"] == f"{em['tokens_per_s'] / runs['full']['equal_memory']['tokens_per_s']:.2f}"
            assert row["largest batch (predicted)"] == str(em["max_batch_predicted"])
            checked += 2
        q_rows = [r for h, rows in t.items() if h.startswith("Quality after") and h.endswith(title) for r in rows]
        for row in q_rows:
            q = runs[row["method"]]["quality"]
            assert row["steps in that time"] == str(q["at_time"]["step"]) + (" (cap)" if q["at_time"].get("capped") else "")
            assert q["at_time"]["step"] <= entry["max_steps"]
            assert row[f"loss after {entry['steps']} steps"] == f"{q['at_steps']['loss']:.4f}"
    sc = data["scaling"]
    rows = {r["method"]: r for r in t["Scaling: step time and training memory vs depth, sequence length and batch"]}
    for name, res in sc["methods"].items():
        for axis, (ms, mib) in {"depth": ("ms per block", "MiB per block"), "batch": ("ms per example", "MiB per example")}.items():
            pts = res[axis]["points"]
            x = [p["x"] for p in pts]
            slope_t = np.polyfit(x, [p["step_seconds"] for p in pts], 1)[0]
            slope_m = np.polyfit(x, [p["memory"]["total"] for p in pts], 1)[0]
            assert rows[name][ms] == f"{1000 * slope_t:.3f}" and rows[name][mib] == f"{slope_m / 2**20:.3f}"
            checked += 2
    assert checked > 40 * len(PRECISIONS)


def test_predictions_come_from_the_median_profile(suite):
    """Every run has a profile (--quick: one per repeat round, shared); each method's prediction is its recorded
    charges priced by the median of all the profiles of its model and precision. (Under --quick a method's own
    profiles are all of them; test_cost_model's pooling test tells the two apart.)"""
    from layerwise.measure.costmodel import median_profile, predict_charges
    from layerwise.measure.suite import _load_profile

    out, data, _ = suite
    entry = data["models"]["tiny-llama"]
    for prec in PRECISIONS:
        assert set(entry["profiles"][prec]) == set(METHODS)
        every = sorted({p["path"] for taken in entry["profiles"][prec].values() for p in taken})
        assert len(every) == entry["pooled_profiles"][prec] == data["repeats"] == 2
        profiles = [_load_profile(out / p) for p in every]
        med = median_profile(profiles)
        assert med.forward_blocks == [(a + b) / 2 for a, b in zip(profiles[0].forward_blocks, profiles[1].forward_blocks)]
        for label, run in entry["runs"][prec].items():
            paths = [p["path"] for p in entry["profiles"][prec][label]]
            assert len(paths) == data["repeats"] and set(paths) == set(every)
            eb = run["equal_batch"]
            again = predict_charges(med, eb["predicted"]["charges"], eb["predicted"]["block_cost"])
            assert eb["predicted"]["phases"] == pytest.approx(again["phases"])
            assert len(eb["predicted"]["charges"]) == eb["timed_steps"] and "predicted_first_profile" in eb


def test_docs_page_links_resolve(suite, tmp_path):
    from layerwise.measure.report import write_docs

    out, data, md = suite
    docs = tmp_path / "docs" / "benchmarks.md"
    write_docs(data, out, docs)
    page = docs.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page)
    assert len(links) == len(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)) >= 5
    for link in links:
        assert (docs.parent / link).resolve().is_file(), link
    assert data["command"] in page and "### Equal batch, fp32" in page and not (docs.parent / "benchmarks.md.tmp").exists()


def test_switch_cost_against_steady_steps_of_the_same_plan():
    from layerwise.measure.report import switch_cost

    def row(plan, switch, seconds, optimizer):
        return {"plan": plan, "switch": switch, "seconds": seconds, "method_hook": 0.0, "forward": 0.1, "backward": 0.2,
                "optimizer": optimizer, "other": seconds - 0.3 - optimizer}

    steps = [row("a", False, 1.0, 0.1), row("a", False, 1.2, 0.1), row("b", True, 2.0, 0.5), row("b", False, 1.5, 0.1),
             row("c", True, 9.0, 9.0)]  # c has no steady step: not compared
    sw = switch_cost(steps)
    assert sw["switch_steps"] == 2 and sw["compared"] == 1 and sw["timed_steps"] == 5
    assert sw["per_step"]["seconds"] == pytest.approx((2.0 - 1.5) / 5)
    assert sw["per_step"]["optimizer"] == pytest.approx((0.5 - 0.1) / 5)
    assert sw["per_step"]["forward"] == pytest.approx(0.0)
    assert switch_cost([]) is None


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--quick"], "only apply with --suite paper"),
        (["--suite", "paper", "--model", "minilm"], "drop --model"),
        (["--suite", "paper", "--models", "gpt5"], "'gpt5' is not a suite model"),
        (["--suite", "paper", "--methods", "full,dance"], "'dance' is not a suite method"),
        (["--suite", "paper", "--precisions", "fp8"], "--precisions"),
        (["--suite", "paper", "--device", "tpu"], "--device 'tpu'"),
    ],
)
def test_suite_bad_arguments_one_line(tmp_path, capsys, args, needle):
    out = tmp_path / "r"
    assert main(["bench", *args, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_bf16_only_suite_refused_without_bf16_units(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    out = tmp_path / "r"
    assert main(["bench", "--suite", "paper", "--quick", "--precisions", "bf16", "--device", "cpu", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no bf16 matrix units" in err[0] and "add fp32" in err[0], err
    assert not out.exists()


def test_grouped_query_attention_flops_are_counted_as_its_query_heads(monkeypatch):
    """CUDA's fused attention gets 3 key/value heads for 9 query heads (SmolLM2): counted as the 9-head
    product it computes (each key/value head broadcast), forward and backward, not refused as torch's own
    formulas did before 2.13 (stood in for here: they accept only equal head counts)."""
    import torch
    from torch.utils import flop_counter
    from torch.utils.flop_counter import FlopCounterMode

    from layerwise.measure.suite import SDPA_FLOPS

    forward_count, backward_count = flop_counter.sdpa_flop_count, flop_counter.sdpa_backward_flop_count

    def equal_heads(*shapes):
        if len({shape[1] for shape in shapes}) != 1:
            raise AssertionError("sdpa_flop_count: query/key/value shapes are incompatible")

    monkeypatch.setattr(flop_counter, "sdpa_flop_count", lambda q, k, v: equal_heads(q, k, v) or forward_count(q, k, v))
    monkeypatch.setattr(flop_counter, "sdpa_backward_flop_count",
                        lambda g, q, k, v: equal_heads(g, q, k, v) or backward_count(g, q, k, v))

    b, s, d = 2, 16, 8
    q, g, kv = torch.zeros(b, 9, s, d), torch.zeros(b, 9, s, d), torch.zeros(b, 3, s, d)
    registry = FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS).flop_registry
    aten = torch.ops.aten
    forward = registry[aten._scaled_dot_product_efficient_attention](q, kv, kv, out_val=q)
    backward = registry[aten._scaled_dot_product_flash_attention_backward](g, q, kv, kv, out_val=q)
    assert forward == 2 * (2 * b * 9 * s * s * d)  # scores and scores @ values
    assert backward == 5 * (2 * b * 9 * s * s * d)  # recomputed scores and four gradient products
    full_heads = registry[aten._scaled_dot_product_efficient_attention](q, q, q, out_val=q)
    assert full_heads == forward
    # torch's own formula, as before 2.13, refuses the same call.
    with pytest.raises(AssertionError, match="incompatible"):
        FlopCounterMode(display=False).flop_registry[aten._scaled_dot_product_efficient_attention](q, kv, kv, out_val=q)
