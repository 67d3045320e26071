"""A layerwise method in a plain transformers.Trainer or TRL SFTTrainer script, on the packaged models and data
(docs/hf-trainer.md). Every method, one process or several, and resume:

    python docs/hf_trainer_example.py --method lift                        # MiniLM + Rotten Tomatoes, Trainer
    python docs/hf_trainer_example.py --method ist --sft                   # SmolLM2 + chatterbot chats, SFTTrainer
    torchrun --nproc-per-node 2 docs/hf_trainer_example.py --method lisa   # data parallel, the set switching
    python docs/hf_trainer_example.py --method freeze --option top=2       # method options: --option KEY=VALUE
    python docs/hf_trainer_example.py --method lift --resume out-hf/checkpoint-20

Offline (packaged weights and data): HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1.
"""

from __future__ import annotations

import argparse
import json

import datasets
import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from layerwise.data.sources import chatterbot, rotten_tomatoes
from layerwise.integrations.hf import LayerwiseCallback
from layerwise.methods import default_lr, method_config
from layerwise.models import resolve_model_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="lift")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a method option (k=2, top=1, r=8, ...)")
    ap.add_argument("--sft", action="store_true", help="TRL's SFTTrainer on SmolLM2 and chats (default: Trainer on MiniLM)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--output", default="out-hf")
    ap.add_argument("--resume", default=None, help="a checkpoint folder of an earlier run of this script")
    cli = ap.parse_args()
    options = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in cli.option)}
    if cli.method == "freeze" and not options:
        options = {"top": 1}
    lr = default_lr(method_config({"name": cli.method, **options}))  # the method's own default learning rate
    # Without a GPU the Trainer needs use_cpu=True, or under torchrun every process trains alone (transformers warns);
    # and SFTConfig's default bf16 is refused there: float32.
    on_cpu = {} if torch.cuda.is_available() else {"use_cpu": True, "bf16": False}
    common = dict(output_dir=cli.output, max_steps=cli.steps, learning_rate=lr, warmup_steps=0, logging_steps=10,
                  save_steps=20, report_to=[])

    if cli.sft:
        from trl import SFTConfig, SFTTrainer

        path = resolve_model_path("smollm2")
        tokenizer = AutoTokenizer.from_pretrained(path)
        chats = datasets.Dataset.from_dict({"messages": [json.loads(m) for m in chatterbot()["messages"]]})
        args = SFTConfig(per_device_train_batch_size=4, max_length=128, **on_cpu, **common)
        cb = LayerwiseCallback(AutoModelForCausalLM.from_pretrained(path), cli.method, args=args, **options)
        trainer = SFTTrainer(model=cb.model, args=args, train_dataset=chats, processing_class=tokenizer,
                             optimizers=(cb.optimizer, None), callbacks=[cb])
    else:
        path = resolve_model_path("minilm")
        tokenizer = AutoTokenizer.from_pretrained(path)
        reviews = datasets.Dataset.from_dict(rotten_tomatoes()[0]).map(
            lambda rows: tokenizer(rows["text"], truncation=True, max_length=64), batched=True, remove_columns=["text"])
        args = TrainingArguments(per_device_train_batch_size=16, **on_cpu, **common)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        model.accepts_loss_kwargs = False  # its loss ignores num_items_in_batch: let the Trainer scale it (docs/hf-trainer.md)
        cb = LayerwiseCallback(model, cli.method, args=args, **options)
        trainer = Trainer(model=cb.model, args=args, train_dataset=reviews, data_collator=DataCollatorWithPadding(tokenizer),
                          optimizers=(cb.optimizer, None), callbacks=[cb])

    result = trainer.train(resume_from_checkpoint=cli.resume)
    if trainer.is_world_process_zero():
        print(f"{cli.method}: {cb.switches} switches, last plan {cb.plan.describe()}, mean training loss {result.training_loss:.4f}")


if __name__ == "__main__":
    main()
