"""Bad input, fuzzed: random configs, random ``--set`` overrides and corrupted data files fed to the CLI.

Every case must either return 0 or return non-zero with exactly one stderr line that starts with
``layerwise: error:`` (and is not the catch-all for unexpected exceptions, which would mean a check
is missing), never raise out of ``main``, and never leave a ``summary.json`` unless it returned 0.

Most cases stop before training (``Run.execute`` is replaced by a stub and the tiny model is
loaded once and copied), so hundreds of examples run in seconds; a few cases train for real.
``LAYERWISE_FUZZ_SCALE=10`` runs ten times as many examples with fresh random seeds.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import string
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerwise.cli import main

SCALE = int(os.environ.get("LAYERWISE_FUZZ_SCALE", "1"))


def fuzz_settings(n: int):
    # Fixed examples in CI (derandomize) so a shared suite is deterministic; LAYERWISE_FUZZ_SCALE explores.
    return settings(
        max_examples=n * SCALE, deadline=None, derandomize=SCALE == 1, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
    )


# ---------------------------------------------------------------------------------------------
# Running the CLI and judging the outcome


@contextlib.contextmanager
def fast_runs():
    """Stop every run after validation and model setup (no training), with the model loaded once."""
    import layerwise.run as run_mod

    real = run_mod.load_model_and_tokenizer
    cache: dict = {}

    def cached(spec, task, **kwargs):
        key = (spec, task, kwargs.get("num_labels"), tuple(kwargs.get("label_names") or ()), kwargs.get("trust_remote_code"))
        if key not in cache:
            cache[key] = real(spec, task, **kwargs)
        model, tok, info = cache[key]
        return copy.deepcopy(model), tok, dict(info)

    with mock.patch.object(run_mod, "load_model_and_tokenizer", cached), mock.patch.object(run_mod.Run, "execute", lambda self: {}):
        yield


def run_cli(argv: list[str], out: Path) -> tuple[int, str]:
    err, std = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
            code = main(argv)
    except BaseException as exc:  # noqa: BLE001 - anything escaping main is the failure we look for
        pytest.fail(f"{type(exc).__name__} escaped main({argv!r}): {exc}")
    text = err.getvalue()
    lines = [line for line in text.strip().splitlines() if line.strip()]
    # Logged notices (trust_remote_code, a GGUF conversion) are allowed above the error line.
    notices = [line for line in lines if line.startswith("layerwise: trust_remote_code is ON")]
    errors = [line for line in lines if line not in notices]
    if code != 0:
        assert len(errors) == 1 and errors[0].startswith("layerwise: error:"), f"main({argv!r}) -> {code}, stderr:\n{text}"
        assert not errors[0].startswith("layerwise: error: unexpected "), f"an input no check caught: main({argv!r}):\n{text}"
        assert not (out / "summary.json").exists(), "a failed run left a summary.json"
        assert not (out / "model").exists(), "a failed run left a model"
    return code, text


@pytest.fixture(scope="module")
def scratch():
    path = Path(tempfile.mkdtemp(prefix="layerwise-fuzz-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def fresh(scratch: Path, name: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=name, dir=scratch))
    return path


BASE = [
    "--set=train.batch_size=2", "--set=train.progress=false", "--set=data.max_length=16", "--set=train.eval_batch_size=8",
    "--set=data.max_eval_samples=4", "--set=train.warmup_steps=0", "--set=train.eval_before=false",
]

# ---------------------------------------------------------------------------------------------
# Strategies

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["", "0", "1e-3", "nan", "-inf", "auto", "cpu", "cuda", "cuda:7", "meta", "..", "../x", "/", "~", "null"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=6)

TRAIN_KEYS = [
    "max_steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "lr_schedule", "max_grad_norm", "bf16",
    "gradient_checkpointing", "optimizer_state", "seed", "eval_batch_size", "eval_before", "eval_after", "log_every", "save_model",
    "save_every", "keep_last", "device", "progress", "on_nonfinite", "max_skipped_steps", "memory_check", "disk_check",
]
DATA_KEYS = [
    "source", "task", "text_column", "text_pair_column", "label_column", "prompt_column", "response_column", "labels", "eval_size",
    "seed", "max_length", "padding", "max_train_samples", "max_eval_samples",
]
METHOD_KEYS = [
    "name", "k", "switch_every", "layers", "top", "bottom", "embeddings", "head", "schedule", "r", "alpha", "dropout",
    "target_modules", "probe_every", "update_ratio", "cut", "samples", "anchor_every", "check",
]
METHODS = ["full", "freeze", "lift", "lisa", "lora", "ist", "meft", "salf", "dance", ""]

keys = st.one_of(
    st.sampled_from([f"train.{k}" for k in TRAIN_KEYS] + [f"data.{k}" for k in DATA_KEYS] + [f"method.{k}" for k in METHOD_KEYS]
                    + ["model", "task", "blocks", "trust_remote_code", "output", "method", "data", "train"]),
    st.text(alphabet=string.ascii_letters + "._-[]= ", max_size=16),
)
override_values = st.one_of(
    st.sampled_from(["0", "1", "2", "-1", "1e-3", "3e-4", "nan", "inf", ".inf", "true", "false", "null", "[]", "[0, 1]", "[1, x]",
                     "{a: 1}", "{", "[", "'", "\"", ": :", "lift", "full", "cpu", "cuda", "longest", "skip", "1.5", "1_000", "0x10"]),
    st.text(max_size=12),
)


@st.composite
def config_dicts(draw):
    cfg: dict = {}
    train = draw(st.dictionaries(st.sampled_from(TRAIN_KEYS), values, max_size=3))
    # Keep the runs that pass validation short (the fuzz is about input, not training).
    cfg["train"] = train
    if draw(st.booleans()):
        cfg["data"] = draw(st.dictionaries(st.sampled_from(DATA_KEYS), values, max_size=3))
    if draw(st.booleans()):
        name = draw(st.sampled_from(METHODS))
        extra = draw(st.dictionaries(st.sampled_from(METHOD_KEYS[1:]), values, max_size=2))
        cfg["method"] = draw(st.sampled_from([name, {"name": name, **extra}, extra]))
    for key in draw(st.lists(st.sampled_from(["task", "blocks", "trust_remote_code", "output", "model"]), max_size=2)):
        cfg[key] = draw(values)
    if draw(st.integers(0, 9)) == 0:
        cfg[draw(st.text(max_size=8))] = draw(values)
    if draw(st.integers(0, 9)) == 0:
        cfg = draw(st.sampled_from([[cfg], "just text", 3, None]))
    return cfg


# ---------------------------------------------------------------------------------------------
# Random configs and overrides (validation only)


@fuzz_settings(130)
@given(cfg=config_dicts(), raw=st.one_of(st.none(), st.binary(max_size=40), st.text(max_size=40)))
def test_random_config_files(tiny_bert_dir, cls_jsonl, scratch, cfg, raw):
    folder = fresh(scratch, "cfg-")
    path = folder / "run.yaml"
    if raw is None:
        path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    else:
        path.write_bytes(raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass"))
    out = folder / "run"
    with fast_runs():
        run_cli(["train", str(path), "--model", tiny_bert_dir, "--data", cls_jsonl, "--output", str(out), *BASE, "--max-steps", "1"], out)


@fuzz_settings(130)
@given(overrides=st.lists(st.one_of(st.tuples(keys, override_values).map(lambda kv: f"{kv[0]}={kv[1]}"), st.text(max_size=16)), min_size=1, max_size=3))
def test_random_overrides(tiny_bert_dir, cls_jsonl, scratch, overrides):
    folder = fresh(scratch, "set-")
    out = folder / "run"
    argv = ["train", "--model", tiny_bert_dir, "--data", cls_jsonl, "--output", str(out), "--max-steps", "1", *BASE]
    with fast_runs():
        run_cli(argv + [f"--set={o}" for o in overrides], out)


# ---------------------------------------------------------------------------------------------
# Corrupted data files


def good_rows(n: int, label_kind: str = "int") -> list[dict]:
    words = "good bad fine dull great awful".split()
    rows = []
    for i in range(n):
        label = i % 2
        rows.append({"text": " ".join(words[(i + j) % len(words)] for j in range(3 + i % 4)), "label": {"int": label, "str": ["neg", "pos"][label], "bool": bool(label)}[label_kind]})
    return rows


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@st.composite
def corrupted_files(draw):
    """(suffix, bytes) of a data file broken in one of many ways (some still valid)."""
    n = draw(st.integers(1, 24))
    rows = good_rows(n, draw(st.sampled_from(["int", "str", "bool"])))
    kind = draw(st.sampled_from([
        "valid", "truncated", "wrong_types", "non_utf8", "empty", "blank_lines", "huge_line", "missing_labels", "mixed_labels",
        "float_labels", "label_values", "not_objects", "csv_wrong_columns", "csv_ragged", "csv_valid", "json_array", "json_weird",
        "parquet_garbage", "random_bytes", "nul_bytes", "bom",
    ]))
    suffix = ".jsonl"
    if kind == "valid":
        data = jsonl(rows)
    elif kind == "truncated":
        data = jsonl(rows)
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    elif kind == "wrong_types":
        for r in rows:
            if draw(st.booleans()):
                r[draw(st.sampled_from(["text", "label"]))] = draw(values)
        data = jsonl(rows)
    elif kind == "non_utf8":
        data = bytearray(jsonl(rows))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        data[at:at] = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\x80\x80", b"\xed\xa0\x80"]))
        data = bytes(data)
        suffix = draw(st.sampled_from([".jsonl", ".csv", ".json"]))
    elif kind == "empty":
        data = draw(st.sampled_from([b"", b"\n", b"   \n\n", b"{}", b"[]", b"null"]))
        suffix = draw(st.sampled_from([".jsonl", ".csv", ".json", ".parquet"]))
    elif kind == "blank_lines":
        data = b"\n\n" + jsonl(rows).replace(b"\n", b"\n\n  \n")
    elif kind == "huge_line":
        rows[0]["text"] = "word " * draw(st.integers(20_000, 60_000))
        data = jsonl(rows)
    elif kind == "missing_labels":
        for r in rows:
            if draw(st.booleans()):
                r.pop("label")
        data = jsonl(rows)
    elif kind == "mixed_labels":
        for r in rows:
            r["label"] = draw(st.sampled_from([0, 1, "0", "pos", True, 2, None, 1.0, [1]]))
        data = jsonl(rows)
    elif kind == "float_labels":
        for r in rows:
            r["label"] = draw(st.floats(allow_nan=True, allow_infinity=True))
        data = jsonl(rows)
    elif kind == "label_values":
        big = draw(st.sampled_from([2**70, -1, 10**6, 5]))
        rows[-1]["label"] = big
        data = jsonl(rows)
    elif kind == "not_objects":
        data = b"\n".join(draw(st.sampled_from([b"[1, 2]", b"3", b'"text"', b"null", b"true", b"{"])) for _ in range(n))
    elif kind == "csv_wrong_columns":
        header = draw(st.lists(st.text(alphabet=string.ascii_letters + ", \"", max_size=6), min_size=1, max_size=3))
        data = ("\n".join([",".join(header)] + [f"row {i},{i % 2}" for i in range(n)]) + "\n").encode()
        suffix = ".csv"
    elif kind == "csv_ragged":
        data = ("text,label\n" + "\n".join(",".join(["x"] * draw(st.integers(0, 4))) + f",{i % 2}" for i in range(n)) + "\n").encode()
        suffix = ".csv"
    elif kind == "csv_valid":
        data = ("text,label\n" + "".join(f"\"{r['text']}\",{r['label']}\n" for r in rows)).encode()
        suffix = ".csv"
    elif kind == "json_array":
        data = json.dumps(rows if draw(st.booleans()) else {"text": [r["text"] for r in rows], "label": [r["label"] for r in rows][: draw(st.integers(0, n))]}).encode()
        suffix = ".json"
    elif kind == "json_weird":
        data = json.dumps(draw(values)).encode()
        suffix = ".json"
    elif kind == "parquet_garbage":
        data = b"PAR1" + draw(st.binary(max_size=64)) + b"PAR1"
        suffix = ".parquet"
    elif kind == "random_bytes":
        data = draw(st.binary(max_size=200))
        suffix = draw(st.sampled_from([".jsonl", ".csv", ".json", ".parquet"]))
    elif kind == "nul_bytes":
        data = jsonl(rows).replace(b"good", b"go\x00od")
        suffix = draw(st.sampled_from([".jsonl", ".csv"]))
    else:  # bom
        data = b"\xef\xbb\xbf" + jsonl(rows)
    return suffix, data


@fuzz_settings(80)
@given(case=corrupted_files(), extra=st.lists(st.sampled_from(["--set=data.eval_size=2", "--set=data.labels=[neg, pos]", "--set=data.max_train_samples=1", "--set=data.eval_size=0.5"]), max_size=2))
def test_corrupted_data_files(tiny_bert_dir, scratch, case, extra):
    suffix, data = case
    folder = fresh(scratch, "data-")
    path = folder / f"data{suffix}"
    path.write_bytes(data)
    out = folder / "run"
    with fast_runs():
        run_cli(["train", "--model", tiny_bert_dir, "--data", str(path), "--output", str(out), "--max-steps", "1", *BASE, *extra], out)


# ---------------------------------------------------------------------------------------------
# A few cases that train for real


@fuzz_settings(6)
@given(
    case=corrupted_files(),
    steps=st.integers(1, 2),
    method=st.sampled_from(["full", "lift", "freeze", "lora"]),
    more=st.lists(st.sampled_from(["--set=train.save_model=false", "--set=train.lr=1e30", "--set=train.on_nonfinite=skip", "--set=train.max_grad_norm=null"]), max_size=2),
)
def test_corrupted_data_trains_or_fails_cleanly(tiny_bert_dir, scratch, case, steps, method, more):
    suffix, data = case
    folder = fresh(scratch, "train-")
    path = folder / f"data{suffix}"
    path.write_bytes(data)
    out = folder / "run"
    method_args = ["--method", method] + (["--set=method.top=1"] if method == "freeze" else [])
    code, _ = run_cli(["train", "--model", tiny_bert_dir, "--data", str(path), "--output", str(out), "--max-steps", str(steps), *BASE, *method_args, *more], out)
    if code == 0:
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == steps


# ---------------------------------------------------------------------------------------------
# Inputs the fuzzer (or a review of what it reaches) found, kept as fixed cases


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--set=\r"], "must look like key=value"),  # a line break in user input made the message two lines
        (["--set=train.colour=a\nb"], "unknown config key"),
        (["--set=data.eval_size=.nan"], "data.eval_size"),  # NaN reached int(round(nan)): ValueError
        (["--set=data.eval_size=.inf"], "data.eval_size"),  # inf: OverflowError
        (["--set=train.grad_accum=0"], "train.grad_accum"),  # no micro-batch, no backward, a 0/0 loss
        (["--set=train.batch_size=-1"], "train.batch_size"),
        (["--set=train.log_every=0"], "train.log_every"),
        (["--set=train.lr=.nan"], "train.lr"),
        (["--set=train.max_grad_norm=-1"], "train.max_grad_norm"),
        (["--set=train.warmup_steps=-5"], "train.warmup_steps"),
        (["--set=data.max_length=4096"], "positions"),  # BERT's position embeddings: IndexError mid-run
        (["--max-steps", "x"], "invalid int value"),  # argparse usage errors: one line, not usage + error
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_fixed_bad_inputs(tiny_bert_dir, cls_jsonl, tmp_path, extra, needle):
    out = tmp_path / "run"
    with fast_runs():
        code, err = run_cli(["train", "--model", tiny_bert_dir, "--data", cls_jsonl, "--output", str(out), *BASE, *extra], out)
    assert code == 2 and needle in err, err


def test_non_utf8_config_file(tiny_bert_dir, cls_jsonl, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"train:\n  lr: \xff\n")
    code, err = run_cli(["train", str(path), "--model", tiny_bert_dir, "--data", cls_jsonl, "--output", str(tmp_path / "run")], tmp_path / "run")
    assert code == 2 and "not valid YAML" in err


def test_unexpected_exception_is_one_line_with_a_log(tiny_bert_dir, cls_jsonl, tmp_path, capsys):
    import layerwise.run as run_mod

    def boom(self):
        raise RuntimeError("simulated bug\nsecond line")

    out = tmp_path / "run"
    with mock.patch.object(run_mod.Run, "execute", boom):
        code = main(["train", "--model", tiny_bert_dir, "--data", cls_jsonl, "--output", str(out), *BASE])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("layerwise: error: unexpected RuntimeError: simulated bug second line"), err
    log = Path(err[0].rsplit("traceback in ", 1)[1].rstrip(")"))
    assert "Traceback" in log.read_text() and "boom" in log.read_text()
    log.unlink()
