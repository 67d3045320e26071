"""MEFT's own measurements (docs/meft.md): reconstruction error by depth, gradient error against
autograd, and bytes saved for backward, on a packaged or given model."""

from __future__ import annotations

import copy
import json

import torch

from layerwise.engine.meter import SavedTensorMeter
from layerwise.methods.meft.method import MeftConfig, adapter_parameters, apply_meft
from layerwise.models import default_task_for, load_model_and_tokenizer, resolve_model_path


def _inputs(model, tokenizer, batch: int, length: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = min(model.config.vocab_size, len(tokenizer) if tokenizer is not None else model.config.vocab_size)
    ids = torch.randint(100, vocab - 1, (batch, length), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model.config.model_type == "bert":
        out["labels"] = torch.zeros(batch, dtype=torch.long)
    else:
        out["labels"] = ids.clone()
    return out


def reconstruction_report(model="minilm", task=None, *, variants=(1, 2, 3), batch: int = 2, length: int = 32,
                          precisions=("fp32", "bf16"), seed: int = 0) -> dict:
    """Relative error of the reconstructed block inputs after reconstructing 1, 2, ... blocks
    from the top, with no anchors (check mode), adapters at their initialisation, dropout off.

    Returns ``{"fp32": {1: [err after 1 block, 2 blocks, ...], 2: [...], ...}, "bf16": {...}}``
    (bf16 = bf16 autocast, coupling arithmetic in fp32).
    """
    if isinstance(model, str):
        task = task or default_task_for(resolve_model_path(model))
        base_model, tokenizer, _ = load_model_and_tokenizer(model, task)
    else:
        base_model, tokenizer = model, None
    report: dict = {}
    for prec in precisions:
        report[prec] = {}
        for v in variants:
            m = copy.deepcopy(base_model)
            torch.manual_seed(seed)
            cfg = MeftConfig(variant=v, anchor_every=0, check=True, max_reconstruction_error=None, dropout=0.0)
            runner = apply_meft(m, cfg)
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
            for p in adapter_parameters(m):
                p.requires_grad_(True)
            batch_t = _inputs(m, tokenizer, batch, length, seed)
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if prec == "bf16" else torch.autocast("cpu", enabled=False)
            with ctx:
                out = m(**batch_t)
            out.loss.backward()
            errs = runner.stack.errors
            report[prec][v] = [errs[i] for i in sorted(errs, reverse=True)]
            del m
    return report


def gradient_error_report(model="minilm", *, variants=(1, 2, 3), anchors=(0, 2, 3), batch: int = 2, length: int = 32,
                          seed: int = 0) -> dict:
    """Relative error of the adapter gradients of the reversible backward against ordinary
    autograd on the same network (same dropout masks), for each variant and ``anchor_every``.
    Returns ``{variant: {anchor_every: relative error}}``."""
    if isinstance(model, str):
        base_model, tokenizer, _ = load_model_and_tokenizer(model, default_task_for(resolve_model_path(model)))
    else:
        base_model, tokenizer = model, None
    batch_t = _inputs(base_model, tokenizer, batch, length, seed)

    def grads(v, k, rev):
        m = copy.deepcopy(base_model)
        torch.manual_seed(seed)
        apply_meft(m, MeftConfig(variant=v, anchor_every=k, reversible_backward=rev, max_reconstruction_error=None))
        m.train()
        for p in m.parameters():
            p.requires_grad_(False)
        ps = adapter_parameters(m)
        for p in ps:
            p.requires_grad_(True)
        torch.manual_seed(seed + 1)
        m(**batch_t).loss.backward()
        return torch.cat([p.grad.flatten() for p in ps])

    out: dict = {}
    for v in variants:
        ref = grads(v, 0, False)
        out[v] = {k: float((grads(v, k, True) - ref).norm() / ref.norm()) for k in anchors}
    return out


def saved_bytes_report(model="minilm", *, batch: int = 32, length: int = 128, variant: int = 1,
                       anchor_every: int | None = None, reversible_layers=None) -> dict:
    """Bytes saved for backward by one training forward (``SavedTensorMeter``) for ``full``
    fine-tuning and for ``meft`` on the same batch."""
    if isinstance(model, str):
        task = default_task_for(resolve_model_path(model))
        base_model, tokenizer, _ = load_model_and_tokenizer(model, task)
    else:
        base_model, tokenizer = model, None
    batch_t = _inputs(base_model, tokenizer, batch, length)
    result = {}
    for name in ("full", "meft"):
        m = copy.deepcopy(base_model)
        m.train()
        if name == "meft":
            apply_meft(m, MeftConfig(variant=variant, anchor_every=anchor_every, reversible_layers=reversible_layers))
            for p in m.parameters():
                p.requires_grad_(False)
            for p in adapter_parameters(m):
                p.requires_grad_(True)
        meter = SavedTensorMeter(m)
        with meter.track():
            out = m(**batch_t)
        result[name] = meter.last_bytes
        del out, m
    result["reduction"] = 1.0 - result["meft"] / result["full"]
    return result


def print_report(args) -> None:
    """``layerwise measure meft errors|grads|memory [MODEL]``: one of the reports above, printed."""
    if args.report == "errors":
        rep = reconstruction_report(args.model, batch=args.batch or 2, length=args.length or 32,
                                    variants=tuple(int(v) for v in args.variants.split(",")))
        for prec, by_v in rep.items():
            for v, errs in by_v.items():
                print(f"{prec} MEFT{v}: " + ", ".join(f"{e:.1e}" for e in errs))
    elif args.report == "grads":
        rep = gradient_error_report(args.model, batch=args.batch or 2, length=args.length or 32,
                                    variants=tuple(int(v) for v in args.variants.split(",")))
        for v, by_k in rep.items():
            print(f"MEFT{v}: " + ", ".join(f"anchor_every={k}: {e:.1e}" for k, e in by_k.items()))
    else:
        rep = saved_bytes_report(args.model, batch=args.batch or 32, length=args.length or 128)
        print(json.dumps(rep))

