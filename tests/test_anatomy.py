"""Anatomy: blocks, embeddings, final norm and head of tiny random models of every supported family."""

from __future__ import annotations

import functools
import os
from operator import attrgetter

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft
import pytest
import torch
import transformers as T
from torch import nn

from layerwise import anatomy as anatomy_mod
from layerwise.anatomy import Anatomy, UnsupportedModelError, find_anatomy

T.logging.set_verbosity_error()
# peft calls a transformers API that v5 deprecates (is_gradient_checkpointing): not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

L = 3  # layers of every tiny model: 3 so that an off-by-one or reversed order shows
VOCAB = 128

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=L,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
)
_DECODER = dict(_COMMON, num_key_value_heads=2, head_dim=8)

# name -> (config factory, encoder?, blocks path in the base model)
ARCHS: dict[str, tuple] = {
    "bert": (lambda: T.BertConfig(**_COMMON), True, "encoder.layer"),
    "roberta": (lambda: T.RobertaConfig(**dict(_COMMON, pad_token_id=1)), True, "encoder.layer"),
    "distilbert": (
        lambda: T.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=L, n_heads=4, hidden_dim=64, max_position_embeddings=64, pad_token_id=0
        ),
        True,
        "transformer.layer",
    ),
    "gpt2": (
        lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=L, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, pad_token_id=0),
        False,
        "h",
    ),
    "gpt_neox": (lambda: T.GPTNeoXConfig(**_COMMON), False, "layers"),
    # word_embed_proj_dim != hidden_size: OPT then has project_in (embeddings) and project_out (head).
    "opt": (
        lambda: T.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=L, num_attention_heads=4, ffn_dim=64,
            max_position_embeddings=64, word_embed_proj_dim=16, pad_token_id=1, bos_token_id=0, eos_token_id=0,
        ),
        False,
        "decoder.layers",
    ),
    "llama": (lambda: T.LlamaConfig(**_DECODER, tie_word_embeddings=False), False, "layers"),
    "llama_tied": (lambda: T.LlamaConfig(**_DECODER, tie_word_embeddings=True), False, "layers"),  # SmolLM-style
    "mistral": (lambda: T.MistralConfig(**_DECODER), False, "layers"),
    "qwen2": (lambda: T.Qwen2Config(**_DECODER), False, "layers"),
    "qwen3": (lambda: T.Qwen3Config(**_DECODER), False, "layers"),
    "gemma": (lambda: T.GemmaConfig(**_DECODER), False, "layers"),
    "gemma2": (lambda: T.Gemma2Config(**_DECODER), False, "layers"),
    "gemma3": (lambda: T.Gemma3TextConfig(**_DECODER), False, "layers"),
    "phi3": (lambda: T.Phi3Config(**_DECODER), False, "layers"),
}
_AUTO = {"base": T.AutoModel, "seqcls": T.AutoModelForSequenceClassification, "causal": T.AutoModelForCausalLM}
CASES = [(a, h) for a, (_, enc, _) in ARCHS.items() for h in (("base", "seqcls") if enc else ("base", "seqcls", "causal"))]
_HEAD_ATTRS = ("lm_head", "score", "classifier")


def build(arch: str, head: str) -> nn.Module:
    torch.manual_seed(0)
    model = _AUTO[head].from_config(ARCHS[arch][0]())
    return model.eval()


@functools.cache
def cached(arch: str, head: str) -> nn.Module:
    """A model shared by the read-only tests (they do not change it)."""
    return build(arch, head)


def all_params(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def ids(params) -> set[int]:
    return {id(p) for p in params}


def head_weights(model: nn.Module) -> list[nn.Parameter]:
    """Output-layer weights: lm_head / score / classifier (RoBERTa: classifier.out_proj)."""
    out = []
    for attr in _HEAD_ATTRS:
        m = getattr(model, attr, None)
        if m is not None:
            out.extend(p for n, p in m.named_parameters() if n.endswith("weight"))
    return out


def tokens(model: nn.Module) -> dict:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, VOCAB, (2, 8), generator=g)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


case = pytest.mark.parametrize("arch,head", CASES, ids=[f"{a}-{h}" for a, h in CASES])


# --------------------------------------------------------------------------------------------
@case
def test_blocks_are_the_module_list_in_order(arch, head):
    model = cached(arch, head)
    a = find_anatomy(model)
    assert isinstance(a, Anatomy) and a.model is model
    assert a.num_blocks == model.config.num_hidden_layers == L
    base_path = ARCHS[arch][2]
    prefix = "" if model.base_model is model else model.base_model_prefix + "."
    assert a.blocks_path == prefix + base_path
    container = attrgetter(a.blocks_path)(model)
    assert isinstance(container, nn.ModuleList)
    assert len(a.blocks) == len(container)
    assert all(b is c for b, c in zip(a.blocks, container))  # same objects, same (bottom-first) order


@case
def test_groups_partition_the_parameters(arch, head):
    model = cached(arch, head)
    a = find_anatomy(model)
    groups = a.groups()
    assert list(groups) == ["embeddings", *(f"block.{i}" for i in range(L)), "head"]
    everything = all_params(model)
    seen: dict[int, str] = {}
    for g, params in groups.items():
        for p in params:
            assert id(p) not in seen, f"{everything.get(id(p))} is in {seen.get(id(p))} and {g}"
            seen[id(p)] = g
    assert set(seen) == set(everything), f"missing: {[everything[i] for i in set(everything) - set(seen)]}"
    assert a.other_parameters() == []
    # The per-group methods agree with groups().
    assert ids(a.embedding_parameters()) == ids(groups["embeddings"])
    assert ids(a.head_parameters()) == ids(groups["head"])
    for i in range(L):
        assert ids(a.block_parameters(i)) == ids(groups[f"block.{i}"])
        assert groups[f"block.{i}"], "every block has parameters"
    # Each block's params live under its own path.
    names = all_params(model)
    for i in range(L):
        assert all(names[id(p)].startswith(f"{a.blocks_path}.{i}.") for p in a.block_parameters(i))


@case
def test_embedding_head_and_tied_weights(arch, head):
    model = cached(arch, head)
    a = find_anatomy(model)
    emb, head_ids = ids(a.embedding_parameters()), ids(a.head_parameters())
    assert id(model.get_input_embeddings().weight) in emb
    for w in head_weights(model):
        tied = w is model.get_input_embeddings().weight
        if tied:  # tied LM head: counted once, as an embedding
            assert id(w) in emb and id(w) not in head_ids
        else:
            assert id(w) in head_ids and id(w) not in emb
    if head == "causal":
        tied = model.lm_head.weight is model.get_input_embeddings().weight
        assert tied == bool(model.config.tie_word_embeddings)
    if head == "seqcls":
        assert head_weights(model), "the classification head is found"


@case
def test_final_norm(arch, head):
    model = cached(arch, head)
    a = find_anatomy(model)
    if ARCHS[arch][1]:  # post-LN encoders have no norm after the blocks
        assert a.final_norm == []
        return
    assert len(a.final_norm) == 1
    norm = a.final_norm[0]
    assert "norm" in type(norm).__name__.lower()
    assert not any(norm is m for b in a.blocks for m in b.modules())
    assert ids(norm.parameters()) and ids(norm.parameters()) <= ids(a.head_parameters())


@case
def test_blocks_run_bottom_first(arch, head):
    model = cached(arch, head)
    a = find_anatomy(model)
    calls: list[int] = []
    handles = [b.register_forward_hook(lambda m, args, out, i=i: calls.append(i)) for i, b in enumerate(a.blocks)]
    try:
        with torch.no_grad():
            model(**tokens(model))
    finally:
        for h in handles:
            h.remove()
    assert calls == list(range(L))


@case
def test_generic_search_matches_the_table(arch, head, monkeypatch):
    model = cached(arch, head)
    known = find_anatomy(model)
    monkeypatch.setattr(anatomy_mod, "KNOWN_LAYOUTS", {})
    generic = find_anatomy(model)
    assert generic.blocks_path == known.blocks_path
    assert generic.paths == known.paths
    assert all(x is y for x, y in zip(generic.blocks, known.blocks))
    assert {k: ids(v) for k, v in generic.groups().items()} == {k: ids(v) for k, v in known.groups().items()}


@pytest.mark.parametrize("arch", ["opt", "gpt2"])
def test_extra_embedding_and_head_modules(arch):
    model = cached(arch, "causal")
    a = find_anatomy(model)
    emb = ids(a.embedding_parameters())
    pos = model.model.decoder.embed_positions if arch == "opt" else model.transformer.wpe
    assert ids(pos.parameters()) <= emb
    if arch == "opt":
        assert ids(model.model.decoder.project_in.parameters()) <= emb
        assert ids(model.model.decoder.project_out.parameters()) <= ids(a.head_parameters())


# --------------------------------------------------------------------------------------------
def lora_params_by_block(peft_model: nn.Module, blocks_path: str) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            rest = n.split(blocks_path + ".", 1)[1]
            out.setdefault(int(rest.split(".")[0]), set()).add(id(p))
    return out


@pytest.mark.parametrize(
    "arch,head,targets,task",
    [("llama", "causal", ["q_proj", "v_proj"], "CAUSAL_LM"), ("bert", "seqcls", ["query", "value"], "SEQ_CLS")],
)
def test_anatomy_follows_peft_wrapping(arch, head, targets, task):
    model = build(arch, head)
    a = find_anatomy(model)  # before wrapping
    before = {i: ids(a.block_parameters(i)) for i in range(L)}
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets, task_type=task))
    lora = lora_params_by_block(pm, a.blocks_path)
    assert sorted(lora) == list(range(L)) and all(len(v) == 2 * len(targets) for v in lora.values())

    for wrapped in (a, find_anatomy(pm)):
        assert wrapped.blocks_path == a.blocks_path
        for i in range(L):
            now = ids(wrapped.block_parameters(i))
            assert lora[i] <= now, f"block {i} misses its LoRA parameters"
            assert not any(lora[j] & now for j in lora if j != i)
            assert before[i] <= now  # the frozen base weights are still there
        everything = all_params(pm)
        grouped = [p for ps in wrapped.groups().values() for p in ps]
        assert len(grouped) == len(ids(grouped)) and ids(grouped) == set(everything)
        assert wrapped.other_parameters() == []

    b = find_anatomy(pm)
    assert b.model is pm and a.model is model
    assert all(x is y for x, y in zip(a.blocks, b.blocks))
    if task == "SEQ_CLS":
        # peft swaps the classifier for a ModulesToSaveWrapper at the same path: the old
        # anatomy's head follows the path and includes the trainable copy.
        copy = ids(pm.base_model.model.classifier.modules_to_save.parameters())
        assert copy and copy <= ids(a.head_parameters()) and copy <= ids(b.head_parameters())
    # Trainable after wrapping: exactly the LoRA params (+ the head copy) fall into groups.
    trainable = {id(p) for p in pm.parameters() if p.requires_grad}
    assert trainable <= ids(p for ps in a.groups().values() for p in ps)
    name = next(n for n, p in pm.named_parameters() if "lora_A" in n and f"{a.blocks_path}.2." in n)
    assert a.block_index_of(name) == 2


# --------------------------------------------------------------------------------------------
def test_override_blocks_path():
    model = cached("llama", "causal")
    auto = find_anatomy(model)
    for path in ("model.layers", "layers"):  # root-relative, or relative to the base model
        a = find_anatomy(model, blocks=path)
        assert a.blocks_path == "model.layers"
        assert all(x is y for x, y in zip(a.blocks, auto.blocks))
        assert a.paths == auto.paths
        assert a.other_parameters() == []


@pytest.mark.parametrize(
    "path,needle",
    [("model.layerz", "is not a module of LlamaForCausalLM"), ("model.norm", "not an nn.ModuleList"), ("lm_head.weight", "not a module")],
)
def test_override_bad_path_is_a_clear_error(path, needle):
    model = cached("llama", "causal")
    with pytest.raises(ValueError) as info:
        find_anatomy(model, blocks=path)
    assert needle in str(info.value)
    assert "model.layers" in str(info.value)  # lists the ModuleLists that exist
    assert not isinstance(info.value, UnsupportedModelError)


class Stack(nn.Module):
    """A custom model with no config: nothing names its layers."""

    def __init__(self, n: int = 3):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.stack = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(n))
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.stack:
            h = layer(h)
        return self.out(self.norm(h))


def test_unknown_model_raises_with_the_override_hint():
    with pytest.raises(UnsupportedModelError) as info:
        find_anatomy(Stack())
    msg = str(info.value)
    assert "Stack" in msg and "blocks:" in msg and "blocks=" in msg


def test_unknown_model_with_override():
    model = Stack()
    a = find_anatomy(model, blocks="stack")
    assert a.blocks_path == "stack" and a.num_blocks == 3
    assert a.embeddings == [model.embed] and a.final_norm == [model.norm] and a.head == [model.out]
    assert a.other_parameters() == []


def test_generic_search_on_a_model_with_only_a_config():
    model = Stack(n=4)
    model.config = T.PretrainedConfig(num_hidden_layers=4)
    model.get_input_embeddings = lambda: model.embed
    a = find_anatomy(model)
    assert a.blocks_path == "stack" and a.num_blocks == 4
    assert ids(a.embedding_parameters()) == ids(model.embed.parameters())
    assert ids(a.head_parameters()) == ids(model.norm.parameters()) | ids(model.out.parameters())


def test_two_equal_stacks_are_ambiguous():
    model = Stack()
    model.decoder = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
    model.stack = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
    model.config = T.PretrainedConfig(num_hidden_layers=3)
    with pytest.raises(UnsupportedModelError, match="stack.*decoder|decoder.*stack"):
        find_anatomy(model)


@pytest.mark.parametrize("bad", [-1, L, 99])
def test_invalid_block_index_names_the_range(bad):
    a = find_anatomy(cached("bert", "seqcls"))
    with pytest.raises(ValueError, match=rf"0\.\.{L - 1}"):
        a.block_parameters(bad)
    with pytest.raises(IndexError):
        a.block_parameters(bad)


def test_block_index_of():
    model = cached("llama", "causal")
    a = find_anatomy(model)
    assert a.block_index_of("model.layers.1.mlp.up_proj.weight") == 1
    assert a.block_index_of("base_model.model.model.layers.2.self_attn.q_proj.weight") == 2
    assert a.block_index_of("model.norm.weight") is None
    assert a.block_index_of(model.model.layers[2].mlp) == 2
    assert a.block_index_of(model.model.layers[0].self_attn.q_proj.weight) == 0
    assert a.block_index_of(model.lm_head.weight) is None
