"""Trainer and TRL SFTTrainer runs with LayerwiseCallback, one process or one rank under ``torchrun``
(tests/test_hf_distributed.py). For each ``trainer:method[:flag]`` spec it trains a tiny model (no dropout: masks drawn
over two shards cannot equal those over the whole batch) for STEPS steps on rows in dataset order and writes, per rank,
``OUT/<spec with - for :>/rank<R>.json`` (the weights' digest, the logged losses, the plan of every step, the gradient
bytes communicated) and, on rank 0, ``weights.safetensors``.

    torchrun --standalone --nproc-per-node 2 tests/hf_worker.py OUT 4 trainer:lift sft:ist trainer:lisa:bf16 trainer:ist:accum2 ...
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from conftest import Rows, minilm_path, tiny_bert, tiny_llama
from safetensors.torch import save_file

from layerwise.engine.distributed import weights_digest
from layerwise.integrations.hf import LayerwiseCallback

STEPS = 6
OPTIONS = {
    "lift": {"k": 1, "switch_every": 2},
    "lisa": {"k": 1, "switch_every": 2},
    "ist": {"r": 4, "dropout": 0.0, "probe_every": 2, "importance_batch_size": 8},
}
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def chats(n: int = 64):
    """Two-turn conversations of varying length (so the shards' token counts differ)."""
    import datasets

    words = "good bad great awful fine dull superb boring lovely terrible film movie plot actor scene".split()
    return datasets.Dataset.from_dict({"messages": [
        [{"role": "user", "content": f"review {i}: " + " ".join(words[(i + j) % len(words)] for j in range(1 + i % 5))},
         {"role": "assistant", "content": "positive" if i % 2 else "negative"}]
        for i in range(n)
    ]})


def run(trainer_kind: str, method: str, per_device_batch: int, out: Path, bf16: bool = False, accumulate: int = 1) -> LayerwiseCallback:
    """Train with the callback (``accumulate`` micro-batches of ``per_device_batch // accumulate`` rows per step); returns
    it after writing this rank's results under ``out``."""
    from transformers import Trainer, TrainingArguments

    rank = int(os.environ.get("RANK", "0"))
    common = dict(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=per_device_batch // accumulate,
        gradient_accumulation_steps=accumulate, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="steps", logging_steps=1, use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0, train_sampling_strategy="sequential", bf16=bf16,
    )
    if trainer_kind == "trainer":
        model = tiny_bert()
        # The Trainer would take BERT's **kwargs for a loss that divides by num_items_in_batch, which its classification
        # loss ignores, and skip its own scaling (by accumulation steps, for the number of processes).
        model.accepts_loss_kwargs = False
        args = TrainingArguments(**common)
        cb = LayerwiseCallback(model, method, args=args, **OPTIONS[method])
        trainer = Trainer(model=cb.model, args=args, train_dataset=Rows(model, 64), optimizers=(cb.optimizer, None), callbacks=[cb])
    else:
        import trl
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(minilm_path())
        tok.eos_token = tok.sep_token  # the packaged (BERT) tokenizer has no EOS, which SFTTrainer appends
        tok.chat_template = CHAT_TEMPLATE
        args = trl.SFTConfig(max_length=32, **common)
        cb = LayerwiseCallback(tiny_llama(), method, args=args, **OPTIONS[method])
        trainer = trl.SFTTrainer(model=cb.model, args=args, train_dataset=chats(), processing_class=tok,
                                 optimizers=(cb.optimizer, None), callbacks=[cb])
    if rank == 1:  # ranks that start apart must still train as one: the callback starts every rank from rank 0's weights
        with torch.no_grad():
            for p in cb.model.parameters():
                p.add_(0.01)
    dtypes = set()
    first_linear = next(m for m in cb.method.anatomy.blocks[0].modules() if isinstance(m, torch.nn.Linear))
    first_linear.register_forward_hook(lambda m, a, out: dtypes.add(str(out.dtype)))
    trainer.train()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "digest": weights_digest(cb.model),
        "losses": [row["loss"] for row in trainer.state.log_history if "loss" in row],
        "plans": [list(plan.blocks) for _, plan in cb.history],
        "switches": cb.switches,
        "sync_bytes": cb.sync.bytes if cb.sync is not None else None,
        "parameters": sum(p.numel() for p in cb.model.parameters()),
        "active_bytes": sum(p.numel() * p.element_size() for _, plan in cb.history for p in cb.method.parameters(plan)),
        "linear_output_dtypes": sorted(dtypes),
    }))
    if rank == 0:
        save_file({n: p.detach().contiguous() for n, p in cb.model.named_parameters()}, str(out / "weights.safetensors"))
    return cb


if __name__ == "__main__":
    folder, batch = Path(sys.argv[1]), int(sys.argv[2])
    for spec in sys.argv[3:]:  # trainer|sft : method [:bf16] [:accum2]
        kind, method, *flags = spec.split(":")
        run(kind, method, batch, folder / spec.replace(":", "-"), bf16="bf16" in flags, accumulate=2 if "accum2" in flags else 1)
