"""train.frozen_dtype=bf16: frozen blocks held in bf16, active blocks train in float32."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import batch_for, repeat, tiny_bert, tiny_llama

from layerwise.anatomy import find_anatomy
from layerwise.config import resolve
from layerwise.engine import Trainer
from layerwise.engine.settings import TrainConfig
from layerwise.methods import create_method, method_config
from layerwise.run import train


def _trainer(model, method_raw: dict, task: str, steps: int, **cfg):
    anatomy = find_anatomy(model)
    method = create_method(method_config(method_raw), anatomy, task=task, max_steps=steps)
    tcfg = TrainConfig(max_steps=steps, device="cpu", warmup_steps=0, lr=1e-3, **cfg)
    return Trainer(model, method, tcfg, repeat(batch_for(model))), anatomy


def _block_state(block) -> dict:
    return {n: p.detach().clone() for n, p in block.named_parameters()}


@pytest.mark.parametrize("make,task", [(tiny_llama, "causal_lm"), (tiny_bert, "classification")])
def test_frozen_blocks_bf16_active_fp32(make, task):
    model = make()
    original = [_block_state(b) for b in find_anatomy(model).blocks]
    reference = make()
    t, anatomy = _trainer(model, {"name": "lift", "switch_every": 2, "schedule": "top_down"}, task, 6, frozen_dtype="bf16")
    ref, _ = _trainer(reference, {"name": "lift", "switch_every": 2, "schedule": "top_down"}, task, 6)
    L = anatomy.num_blocks
    for _ in range(6):
        rec = t.train_step()
        ref_rec = ref.train_step()
        assert math.isfinite(rec.loss)
        assert abs(rec.loss - ref_rec.loss) < 0.05 * abs(ref_rec.loss) + 1e-3
        for i, block in enumerate(anatomy.blocks):
            want = torch.float32 if i in rec.plan.blocks else torch.bfloat16
            assert {p.dtype for p in block.parameters()} == {want}, (i, rec.plan)
        # Embeddings and head stay float32.
        assert all(p.dtype == torch.float32 for p in anatomy.head_parameters() + anatomy.embedding_parameters())
        # Memory: weights counted at their real size, smaller than the float32 reference.
        assert rec.bytes["weights"] == sum(p.nbytes for p in model.parameters())
        assert rec.bytes["weights"] < ref_rec.bytes["weights"]
        assert rec.bytes["total"] == sum(v for k, v in rec.bytes.items() if k != "total")
    # Blocks that never trained hold their pretrained values (rounded to bf16), unchanged by training.
    trained = {b for b in range(L - 3, L)}
    for i in set(range(L)) - trained:
        for n, p in anatomy.blocks[i].named_parameters():
            assert torch.equal(p.detach(), original[i][n].to(torch.bfloat16)), (i, n)
    # Saved activations are not inflated by parameters: the bf16 copies are recognised as weights.
    assert rec.bytes["activations"] <= ref_rec.bytes["activations"] * 1.01


def test_host_master_restores_exact_float32():
    model = tiny_llama()
    anatomy0 = find_anatomy(model)
    original = [_block_state(b) for b in anatomy0.blocks]
    # bottom_up, 1 step per block, two cycles: each block trains, leaves (bf16) and comes back.
    t, anatomy = _trainer(model, {"name": "lift", "switch_every": 1, "schedule": "bottom_up"}, "causal_lm", 8,
                          frozen_dtype="bf16", frozen_master="host")
    after_first: dict = {}
    for step in range(8):
        rec = t.train_step()
        i = rec.plan.blocks[0]
        if step < 4:
            after_first[i] = _block_state(anatomy.blocks[i])
        else:
            # The block came back: before its step its value was the exact float32 master from cycle 1
            # (checked through the optimizer: one AdamW step moves each element by at most ~lr).
            for n, p in anatomy.blocks[i].named_parameters():
                assert p.dtype == torch.float32
                assert (p.detach() - after_first[i][n]).abs().max() <= 1.5e-3
    # Master copies are counted in weights on CPU.
    assert rec.bytes["weights"] == sum(p.nbytes for p in model.parameters()) + t.frozen.master_bytes()
    t.frozen.restore_all()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # A block's float32 master kept its trained value exactly (not rounded to bf16).
    for i in range(3):
        for n, p in anatomy.blocks[i].named_parameters():
            if not torch.equal(p.detach(), original[i][n]):
                break
        else:
            pytest.fail(f"block {i} did not train")


def test_rounded_master_is_bf16_value():
    model = tiny_llama()
    t, anatomy = _trainer(model, {"name": "lift", "switch_every": 1, "schedule": "top_down"}, "causal_lm", 2, frozen_dtype="bf16")
    low = _block_state(anatomy.blocks[2])  # bf16 while block 3 trains
    t.train_step()
    t.train_step()  # block 2 becomes active: its float32 value is its bf16 value, then one step
    assert anatomy.blocks[2].self_attn.q_proj.weight.dtype == torch.float32
    moved = (anatomy.blocks[2].self_attn.q_proj.weight.detach() - low["self_attn.q_proj.weight"].float()).abs().max()
    assert 0 < moved <= 1.5e-3


def test_run_with_frozen_dtype(tiny_llama_dir, lm_jsonl, tmp_path):
    raw = {
        "model": tiny_llama_dir, "output": str(tmp_path / "run"), "method": {"name": "lift", "switch_every": 1},
        "data": {"source": lm_jsonl, "max_length": 24},
        "train": {"batch_size": 4, "max_steps": 3, "progress": False, "eval_before": False, "save_model": True,
                  "frozen_dtype": "bf16", "memory_check": False, "disk_check": False},
    }
    cfg, mcfg = resolve(raw)
    summary = train(cfg, mcfg, log=lambda *a, **k: None)
    assert math.isfinite(summary["eval"]["loss"])
    total = summary["total_parameters"]
    # Weights: well under float32 for all parameters (embeddings and head stay float32 in this tiny model).
    assert summary["memory"]["weights"] < total * 4
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert all(p.dtype == torch.float32 for p in saved.parameters())


def test_run_with_disk_master_reports_and_cleans_up(tiny_llama_dir, lm_jsonl, tmp_path):
    scratch = tmp_path / "scratch"
    raw = {
        "model": tiny_llama_dir, "output": str(tmp_path / "run"), "method": {"name": "lift", "switch_every": 1},
        "data": {"source": lm_jsonl, "max_length": 24},
        "train": {"batch_size": 4, "max_steps": 3, "progress": False, "eval_before": False, "save_model": False,
                  "frozen_dtype": "bf16", "frozen_master": "disk", "frozen_master_dir": str(scratch),
                  "memory_check": False, "disk_check": False},
    }
    cfg, mcfg = resolve(raw)
    summary = train(cfg, mcfg, log=lambda *a, **k: None)
    fw = summary["frozen_weights"]
    assert fw["master"] == "disk" and fw["dtype"] == "bfloat16" and fw["master_memory_bytes"] == 0
    # Float32 masters went to disk and came back (at a switch, for the final checkpoint, at the end).
    assert fw["bytes_written"] > 0 and fw["bytes_read"] > 0 and fw["io_seconds"] > 0
    assert summary["memory"]["weights"] < summary["total_parameters"] * 4
    assert scratch.exists() and list(scratch.iterdir()) == []  # the run's scratch folder is gone


def test_bf16_frozen_blocks_with_gradient_checkpointing():
    """bf16 frozen blocks above the active one are checkpointed too: same loss, fewer saved bytes."""
    recs = []
    for gc in (False, True):
        model = tiny_bert(layers=4)
        t, _ = _trainer(model, {"name": "lift", "schedule": "bottom_up", "switch_every": 100}, "classification", 2,
                        frozen_dtype="bf16", gradient_checkpointing=gc, max_grad_norm=None)
        recs.append(t.train_step())  # block 0 active, blocks 1-3 bf16 and crossed by the gradient
    assert recs[0].plan.blocks == (0,)
    assert recs[1].loss == pytest.approx(recs[0].loss, rel=1e-6)
    assert recs[1].bytes["activations"] < 0.6 * recs[0].bytes["activations"]


def test_disk_master_is_the_host_master_without_the_memory(tmp_path):
    """frozen_master=disk: the same float32 masters as host (same losses, bitwise the same weights),
    kept in one file per frozen block instead of memory; the scratch folder goes with close()."""
    runs = {}
    for master in ("host", "disk"):
        model = tiny_llama()
        extra = {"frozen_master_dir": str(tmp_path)} if master == "disk" else {}
        t, anatomy = _trainer(model, {"name": "lift", "switch_every": 1, "schedule": "bottom_up"}, "causal_lm", 8,
                              frozen_dtype="bf16", frozen_master=master, **extra)
        losses, files = [], []
        for _ in range(8):
            rec = t.train_step()
            losses.append(rec.loss)
            if master == "disk":
                files.append(sorted(f.name for f in t.frozen.dir.iterdir()))
                # Nothing but the bf16/float32 parameters in memory: masters are not counted.
                assert rec.bytes["weights"] == sum(p.nbytes for p in model.parameters())
                assert t.frozen.master_bytes() == 0
            else:
                assert rec.bytes["weights"] == sum(p.nbytes for p in model.parameters()) + t.frozen.master_bytes()
        t.frozen.restore_all()
        runs[master] = (losses, {n: p.detach().clone() for n, p in model.named_parameters()}, files, t.frozen)
    assert runs["disk"][0] == runs["host"][0]
    host_w, disk_w = runs["host"][1], runs["disk"][1]
    assert host_w.keys() == disk_w.keys() and all(torch.equal(host_w[k], disk_w[k]) for k in host_w)
    # One file per frozen block: the active one (bottom_up, 1 step each: step s trains block s % 4) has none.
    lowp = runs["disk"][3]
    L = len(lowp.blocks)
    for step, names in enumerate(runs["disk"][2]):
        active = step % L
        assert names == [f"block-{i:04d}.safetensors" for i in range(L) if i != active], step
    assert lowp.bytes_written > 0 and lowp.bytes_read > 0 and lowp.io_seconds > 0
    assert lowp.dir.parent == tmp_path and not any(lowp.dir.iterdir())  # restore_all read every master back
    lowp.close()
    assert not lowp.dir.exists()


def test_disk_master_folder_goes_with_the_object(tmp_path):
    """Library use without close(): the scratch folder is removed when the object is collected."""
    import gc

    from layerwise.engine.frozen import FrozenLowPrecision

    blocks = list(find_anatomy(tiny_llama()).blocks)
    lowp = FrozenLowPrecision(blocks, torch.bfloat16, "disk", tmp_path)
    lowp.apply([0])
    folder = lowp.dir
    assert len(list(folder.iterdir())) == len(blocks) - 1
    lowp.remove()  # the blocks' hooks no longer refer to it
    assert not folder.exists()
    lowp = FrozenLowPrecision(blocks, torch.bfloat16, "disk", tmp_path)
    lowp.apply([1])
    folder = lowp.dir
    for h in lowp._handles:
        h.remove()
    del lowp
    gc.collect()
    assert not folder.exists()


def test_disk_master_refuses_a_disk_too_small(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from layerwise.errors import ConfigError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(ConfigError, match=r"needs about .* MiB .* has 0.0 MiB free: set train.frozen_master_dir"):
        _trainer(tiny_llama(), {"name": "lift"}, "causal_lm", 2, frozen_dtype="bf16", frozen_master="disk",
                 frozen_master_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing made


@pytest.mark.parametrize("train,message", [
    ({"frozen_master": "host"}, "has no effect with train.frozen_dtype=fp32"),
    ({"frozen_dtype": "bf16", "frozen_master_dir": "/tmp"}, "only used with train.frozen_master=disk"),
])
def test_frozen_master_config_errors(train, message):
    from layerwise.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        resolve({"train": train})


torchao = pytest.importorskip("torchao", reason="train.frozen_dtype=int8 uses torchao")


@pytest.mark.parametrize("master", ["host", "disk"])
def test_int8_frozen_linears_with_exact_masters(master, tmp_path):
    """frozen_dtype=int8: a frozen block's Linear weights are int8 (+ per-row scales), its other parameters and
    the active block float32; the block's own Parameter objects come back with their exact float32 masters."""
    from layerwise.engine.meter import leaves, tensor_bytes

    model, reference = tiny_llama(), tiny_llama()
    original = [_block_state(b) for b in find_anatomy(model).blocks]
    own = {id(p) for p in model.parameters()}
    extra = {"frozen_master_dir": str(tmp_path)} if master == "disk" else {}
    lift = {"name": "lift", "switch_every": 1, "schedule": "bottom_up"}
    t, anatomy = _trainer(model, lift, "causal_lm", 8, frozen_dtype="int8", frozen_master=master, **extra)
    ref, _ = _trainer(reference, lift, "causal_lm", 8)
    L = anatomy.num_blocks
    for step in range(8):
        rec, ref_rec = t.train_step(), ref.train_step()
        assert abs(rec.loss - ref_rec.loss) < 0.05 * abs(ref_rec.loss) + 1e-3
        for i, block in enumerate(anatomy.blocks):
            q = block.self_attn.q_proj.weight
            if i in rec.plan.blocks:
                assert type(q) is torch.nn.Parameter and q.dtype == torch.float32 and id(q) in own
            else:
                inner = {leaf.dtype for leaf in leaves(q)}
                assert torch.int8 in inner and not q.requires_grad
                assert tensor_bytes(q) < q.numel() * 2  # 1 byte a value + one scale per row
                assert block.input_layernorm.weight.dtype == torch.float32
        assert rec.bytes["weights"] == sum(tensor_bytes(p) for p in model.parameters()) + (t.frozen.master_bytes() if master == "host" else 0)
        assert rec.bytes["weights"] < ref_rec.bytes["weights"] + (t.frozen.master_bytes() if master == "host" else 0)
    t.frozen.restore_all()
    # Every Parameter object is the model's own again, float32, and block 0 (trained at steps 0 and 4) moved
    # from its pretrained value while a never-quantized-for-long block keeps exact masters (no int8 error).
    assert {id(p) for p in model.parameters()} == own and all(p.dtype == torch.float32 for p in model.parameters())
    for i in range(L):
        moved = any(not torch.equal(p.detach(), original[i][n]) for n, p in anatomy.blocks[i].named_parameters())
        assert moved, i
        # Trained twice, one AdamW step at lr 1e-3 each: within 2.5e-3 of the pretrained value, so nothing of
        # the int8 rounding (up to max|w| / 254 per row) stuck to the float32 weights.
        for n, p in anatomy.blocks[i].named_parameters():
            assert (p.detach() - original[i][n]).abs().max() <= 2.5e-3, (i, n)


def test_int8_needs_an_exact_master():
    from layerwise.errors import ConfigError

    with pytest.raises(ConfigError, match="rounded cannot be used with train.frozen_dtype=int8"):
        resolve({"train": {"frozen_dtype": "int8"}})
    with pytest.raises(ConfigError, match="set train.frozen_master=disk"):
        _trainer(tiny_llama(), {"name": "lift"}, "causal_lm", 2, frozen_dtype="int8")


def test_cpu_build_drops_only_torchao_kernel_load_warnings(caplog):
    import logging

    import layerwise  # noqa: F401  (installs the filter)

    log = logging.getLogger("torchao")
    with caplog.at_level(logging.WARNING, logger="torchao"):
        log.warning("Failed to load /site-packages/torchao/_C_cutlass_90a.abi3.so: Could not load this library")
        log.warning("something else about quantization")
    messages = [r.getMessage() for r in caplog.records]
    assert "something else about quantization" in messages
    assert any(m.startswith("Failed to load") for m in messages) == (torch.version.cuda is not None)
