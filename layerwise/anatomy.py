"""Model anatomy: the embeddings, the ordered transformer blocks, the final norm and the head of a model.

Every layer-selective method needs the same map of a model: which parameters are the input
embeddings, which belong to block ``i`` (bottom, i.e. closest to the input, first) and which form
the head (final norm, pooler, classifier / ``score`` / ``lm_head``). :func:`find_anatomy` builds that
map for any supported Hugging Face model:

1. a table of known architectures (by ``config.model_type``) gives the paths directly;
2. otherwise a generic search takes the ``nn.ModuleList`` whose length is the config's layer
   count and whose children share one class, the input embeddings (``get_input_embeddings()``)
   with their embedding siblings, a norm module beside the blocks as final norm, and everything
   else as head;
3. ``blocks="model.layers"`` overrides the block search for anything else.

The :class:`Anatomy` records *paths* and computes parameter lists at call time, so wrapping the
model later with ``peft`` (LoRA adds ``lora_A``/``lora_B`` inside the same block modules, and
``modules_to_save`` replaces the classifier by a wrapper at the same path) is seen by an Anatomy
created before the wrapping.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Iterable

from torch import nn

__all__ = ["Anatomy", "BlockIndexError", "UnsupportedModelError", "find_anatomy"]


class UnsupportedModelError(ValueError):
    """The transformer blocks of a model cannot be found; the message says how to name them (``blocks:``)."""


class BlockIndexError(ValueError, IndexError):
    """A block index outside ``0..num_blocks-1`` (both a ValueError and an IndexError, so either catch works)."""


# --------------------------------------------------------------------------------------------
# Known architectures. Paths are relative to the *base model* (``model.base_model``: the
# ``BertModel`` inside ``BertForSequenceClassification``, the ``LlamaModel`` inside
# ``LlamaForCausalLM``, or the model itself for ``AutoModel``). Missing/None entries are skipped
# (e.g. OPT's project_in/out exist only when word_embed_proj_dim != hidden_size); if the blocks
# path does not exist the generic search runs instead.
@dataclass(frozen=True)
class _Layout:
    blocks: str
    embeddings: tuple[str, ...]
    final_norm: tuple[str, ...] = ()


_LLAMA_LIKE = _Layout("layers", ("embed_tokens",), ("norm",))
_BERT_LIKE = _Layout("encoder.layer", ("embeddings",))
KNOWN_LAYOUTS: dict[str, _Layout] = {
    # encoders (post-LN: no final norm)
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "electra": _Layout("encoder.layer", ("embeddings", "embeddings_project")),  # project: embedding -> hidden size
    "distilbert": _Layout("transformer.layer", ("embeddings",)),
    # decoders
    "gpt2": _Layout("h", ("wte", "wpe"), ("ln_f",)),
    "gpt_neox": _Layout("layers", ("embed_in",), ("final_layer_norm",)),
    "opt": _Layout(
        "decoder.layers",
        ("decoder.embed_tokens", "decoder.embed_positions", "decoder.project_in"),
        ("decoder.final_layer_norm",),
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "smollm3": _LLAMA_LIKE,
}

# Config attributes that hold the number of transformer blocks, most common first.
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
# Trunk children with these names (and parameters) are embeddings; "out"/"head" excludes
# output projections such as OPT's project_out or an old-style ``embed_out`` LM head.
_EMBED_NAME = re.compile(r"emb|^wte$|^wpe$|^wse$|proj(ect)?_in$", re.IGNORECASE)
_NOT_EMBED_NAME = re.compile(r"out|head", re.IGNORECASE)
_NORM_NAME = re.compile(r"norm|^ln_?f$|^ln_out$|^final_ln$", re.IGNORECASE)
_PEFT_PREFIX = "base_model.model."


def _override_hint(example: str = "model.layers") -> str:
    return (
        f"set `blocks: <dotted.path.to.ModuleList>` in the config (for example `blocks: {example}`) "
        f"or pass --set blocks={example}"
    )


# --------------------------------------------------------------------------------------------
@dataclass
class Anatomy:
    """Where the parts of a model are.

    The module lists are what was found when the anatomy was built; the ``*_parameters`` methods
    and :meth:`groups` look the modules up again by path at every call, so adapters injected
    later (``peft.get_peft_model``) are included. Every parameter belongs to exactly one group;
    a parameter shared by several modules (tied input embedding and LM head) is counted once, in
    the first group in the order embeddings, block 0 .. block L-1, final norm, head.
    """

    model: nn.Module
    """The root model as passed to :func:`find_anatomy` (possibly a ``PeftModel``)."""
    embeddings: list[nn.Module]
    """Token/position/type embeddings, embedding LayerNorm, OPT's project_in, ..."""
    blocks: list[nn.Module]
    """The transformer blocks, bottom (closest to the input) first."""
    blocks_path: str
    """Dotted path of the ModuleList of blocks, relative to the *unwrapped* model (inside a PeftModel:
    relative to ``get_base_model()``), e.g. ``"bert.encoder.layer"`` or ``"model.layers"``."""
    final_norm: list[nn.Module]
    """Final norm(s) after the blocks (empty for post-LN encoders such as BERT)."""
    head: list[nn.Module]
    """Everything else after the blocks: pooler, classifier, score, lm_head, project_out, ..."""
    paths: dict[str, tuple[str, ...]] | None = field(default=None, repr=False)
    """Paths (relative to the unwrapped model) of ``embeddings``, ``final_norm`` and ``head``, keyed by
    those names; used to find the *current* module at each path. None: use the module lists as is."""

    # ---------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """Number of transformer blocks L."""
        return len(self.blocks)

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Parameters of the embeddings (including any tied LM head weight)."""
        return _unique_params(self._current("embeddings"))

    def block_parameters(self, i: int) -> list[nn.Parameter]:
        """Parameters of block ``i`` (0 = closest to the input), adapters included."""
        self._check_index(i)
        taken = {id(p) for p in self.embedding_parameters()}
        blocks = self._current_blocks()
        for j in range(operator.index(i)):
            taken.update(id(p) for p in blocks[j].parameters())
        return _unique_params([blocks[operator.index(i)]], exclude=taken)

    def tied_head(self) -> bool:
        """True when the output projection shares its weight with the input embeddings (``tie_word_embeddings``):
        it then trains with the embeddings, and the head group holds only the final norm."""
        embeddings = {id(p) for p in self.embedding_parameters()}
        return any(id(p) in embeddings for m in self._current("head") for p in m.parameters())

    def head_modules(self) -> list[nn.Module]:
        """The head's modules (pooler, classifier, lm_head, ...) as the model holds them now (inside peft too)."""
        return self._current("head")

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the final norm and the head, minus any tied to embeddings or blocks."""
        taken = {id(p) for p in self.embedding_parameters()}
        for b in self._current_blocks():
            taken.update(id(p) for p in b.parameters())
        return _unique_params(self._current("final_norm") + self._current("head"), exclude=taken)

    def groups(self) -> dict[str, list[nn.Parameter]]:
        """``{"embeddings": [...], "block.0": [...], ..., "block.{L-1}": [...], "head": [...]}``, disjoint."""
        taken: set[int] = set()
        out: dict[str, list[nn.Parameter]] = {}
        out["embeddings"] = _unique_params(self._current("embeddings"), exclude=taken)
        taken.update(id(p) for p in out["embeddings"])
        for i, b in enumerate(self._current_blocks()):
            out[f"block.{i}"] = _unique_params([b], exclude=taken)
            taken.update(id(p) for p in out[f"block.{i}"])
        out["head"] = _unique_params(self._current("final_norm") + self._current("head"), exclude=taken)
        return out

    def other_parameters(self) -> list[nn.Parameter]:
        """Parameters of the model that are in no group (empty for supported models)."""
        taken = {id(p) for ps in self.groups().values() for p in ps}
        return _unique_params([self.model], exclude=taken)

    def block_index_of(self, what: str | nn.Module | nn.Parameter) -> int | None:
        """Index of the block holding a parameter/module name, module or parameter; None if in no block.

        Names may be relative to the unwrapped model or to a PeftModel (``base_model.model.`` prefix).
        """
        if isinstance(what, str):
            name = what[len(_PEFT_PREFIX):] if what.startswith(_PEFT_PREFIX) else what
            prefix = self.blocks_path + "."
            if not name.startswith(prefix):
                return None
            head = name[len(prefix):].split(".", 1)[0]
            return int(head) if head.isdigit() and int(head) < self.num_blocks else None
        blocks = self._current_blocks()
        if isinstance(what, nn.Parameter):
            for i in range(self.num_blocks):
                if any(p is what for p in self.block_parameters(i)):
                    return i
            return None
        for i, b in enumerate(blocks):
            if any(m is what for m in b.modules()):
                return i
        return None

    # ---------------------------------------------------------------------------------------
    def _check_index(self, i: int) -> None:
        L = self.num_blocks
        try:  # accept numpy/torch integers too, but not bools or floats
            ok = not isinstance(i, bool) and 0 <= operator.index(i) < L
        except TypeError:
            ok = False
        if not ok:
            raise BlockIndexError(f"invalid block index {i!r}: valid block indices are 0..{L - 1} ({L} blocks)")

    def _root(self) -> nn.Module:
        return unwrap_model(self.model)

    def _current_blocks(self) -> list[nn.Module]:
        # Blocks are never replaced by adapters, but look them up anyway so the lists stay in step.
        try:
            container = self._root().get_submodule(self.blocks_path)
        except AttributeError:
            return list(self.blocks)
        return list(container) if len(container) == len(self.blocks) else list(self.blocks)

    def _current(self, part: str) -> list[nn.Module]:
        modules: list[nn.Module] = list(getattr(self, part))
        if not self.paths or part not in self.paths:
            return modules
        root = self._root()
        current = []
        for path, original in zip(self.paths[part], modules):
            try:
                current.append(root.get_submodule(path))
            except AttributeError:  # removed since: fall back to the module found at build time
                current.append(original)
        return current


# --------------------------------------------------------------------------------------------
def find_anatomy(model: nn.Module, blocks: str | None = None) -> Anatomy:
    """Find the embeddings, blocks, final norm and head of ``model``.

    Args:
        model: a Hugging Face model (``AutoModel``, ``...ForSequenceClassification``,
            ``...ForCausalLM``), a ``peft`` ``PeftModel`` wrapping one, or any module when
            ``blocks`` is given. ``Anatomy.model`` is ``model`` as passed.
        blocks: dotted path of the ``nn.ModuleList``/``nn.Sequential`` of transformer blocks,
            relative to the unwrapped model (``"model.layers"``) or to its base model (``"layers"``);
            None: detect it.

    Raises:
        UnsupportedModelError: the blocks cannot be found (and ``blocks`` was not given).
        ValueError: ``blocks`` does not name a non-empty ModuleList/Sequential of the model.
    """
    root = unwrap_model(model)
    if blocks is not None:
        blocks_path = _resolve_override(root, blocks)
        parts = _generic_parts(root, blocks_path)
    else:
        parts = _known_parts(root)
        if parts is None:
            parts = _generic_parts(root, _search_blocks(root))
    blocks_path, emb_paths, norm_paths = parts
    container = root.get_submodule(blocks_path)
    head_paths = _complement(root, [blocks_path, *emb_paths, *norm_paths])
    paths = {"embeddings": tuple(emb_paths), "final_norm": tuple(norm_paths), "head": tuple(head_paths)}
    return Anatomy(
        model=model,
        embeddings=[root.get_submodule(p) for p in emb_paths],
        blocks=list(container),
        blocks_path=blocks_path,
        final_norm=[root.get_submodule(p) for p in norm_paths],
        head=[root.get_submodule(p) for p in head_paths],
        paths=paths,
    )


# --------------------------------------------------------------------------------------------
def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside peft wrappers and ``torch.compile``."""
    for _ in range(8):
        if type(model).__module__.startswith("peft"):
            if hasattr(model, "get_base_model"):  # PeftModel
                model = model.get_base_model()
                continue
            inner = getattr(model, "model", None)  # a bare tuner (LoraModel)
            if isinstance(inner, nn.Module):
                model = inner
                continue
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            model = inner
            continue
        break
    return model


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else (prefix or path)


def _module_path(root: nn.Module, module: nn.Module) -> str | None:
    for name, m in root.named_modules(remove_duplicate=False):
        if m is module:
            return name
    return None


def _base_prefix(root: nn.Module) -> str:
    """Path of the base model inside ``root`` ("" when ``root`` is the base model or not an HF model)."""
    base = getattr(root, "base_model", None)
    if not isinstance(base, nn.Module) or base is root:
        return ""
    return _module_path(root, base) or ""


def _has_module(root: nn.Module, path: str) -> bool:
    try:
        return root.get_submodule(path) is not None
    except AttributeError:
        return False


def _is_block_list(m: nn.Module) -> bool:
    return isinstance(m, (nn.ModuleList, nn.Sequential))


def _known_parts(root: nn.Module) -> tuple[str, list[str], list[str]] | None:
    config = getattr(root, "config", None)
    layout = KNOWN_LAYOUTS.get(getattr(config, "model_type", None) or "")
    if layout is None:
        return None
    prefix = _base_prefix(root)
    blocks_path = _join(prefix, layout.blocks)
    if not _has_module(root, blocks_path) or not _is_block_list(root.get_submodule(blocks_path)):
        return None  # an unusual variant: let the generic search handle it
    emb = [_join(prefix, p) for p in layout.embeddings if _has_module(root, _join(prefix, p))]
    norm = [_join(prefix, p) for p in layout.final_norm if _has_module(root, _join(prefix, p))]
    return blocks_path, emb, norm


def _layer_count(root: nn.Module) -> int | None:
    config = getattr(root, "config", None)
    if config is None:
        return None
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):  # multimodal configs keep the decoder's layer count in text_config
        try:
            configs.insert(0, get_text())
        except Exception:  # noqa: BLE001 - an odd config: keep the top-level one
            pass
    for cfg in configs:
        for key in _LAYER_COUNT_KEYS:
            n = getattr(cfg, key, None)
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                return n
    return None


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _search_blocks(root: nn.Module) -> str:
    """Dotted path of the ModuleList of blocks: the one of length ``num_hidden_layers`` whose children share a class."""
    name = type(root).__name__
    L = _layer_count(root)
    if L is None:
        raise UnsupportedModelError(
            f"cannot find the transformer blocks of {name} (it has no config with a layer count): {_override_hint()}"
        )
    same_class, mixed = [], []
    for path, m in root.named_modules():
        if not _is_block_list(m) or len(m) != L or not all(_n_params(c) > 0 for c in m):
            continue
        (same_class if len({type(c) for c in m}) == 1 else mixed).append((path, m))
    candidates = same_class or mixed  # mixed classes (hybrid stacks) only when nothing else fits
    if not candidates:
        raise UnsupportedModelError(f"cannot find the transformer blocks of {name}: {_override_hint()}")
    if len(candidates) > 1:
        # Another per-layer list (e.g. small per-layer projections) next to the blocks: take the
        # clearly largest; two comparable stacks (encoder + decoder) are ambiguous.
        candidates.sort(key=lambda c: _n_params(c[1]), reverse=True)
        if _n_params(candidates[0][1]) <= 2 * _n_params(candidates[1][1]):
            listed = ", ".join(p for p, _ in candidates)
            raise UnsupportedModelError(
                f"cannot tell which of {listed} are the transformer blocks of {name}: "
                f"{_override_hint(candidates[0][0])}"
            )
    return candidates[0][0]


def _resolve_override(root: nn.Module, blocks: str) -> str:
    path = blocks.strip()
    if path.startswith(_PEFT_PREFIX):  # a path copied from a PeftModel's parameter names
        path = path[len(_PEFT_PREFIX):]
    name = type(root).__name__
    lists = [p for p, m in root.named_modules() if isinstance(m, nn.ModuleList) and p]
    known = f"; the ModuleLists of {name} are: {', '.join(lists)}" if lists else f"; {name} has no nn.ModuleList"
    if not path:
        raise ValueError(f"an empty path does not name the transformer blocks of {name}{known}")
    if not _has_module(root, path):
        prefix = _base_prefix(root)
        if prefix and _has_module(root, _join(prefix, path)):  # relative to the base model: accept
            path = _join(prefix, path)
        else:
            raise ValueError(f"`{blocks}` is not a module of {name}{known}")
    m = root.get_submodule(path)
    if not _is_block_list(m):
        raise ValueError(
            f"`{blocks}` is a {type(m).__name__} in {name}, not an nn.ModuleList or nn.Sequential of blocks{known}"
        )
    if len(m) == 0:
        raise ValueError(f"`{blocks}` in {name} is empty: it holds no transformer blocks")
    return path


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _is_norm(name: str, m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or "norm" in type(m).__name__.lower() or bool(
        _NORM_NAME.search(name)
    )


def _is_embedding(name: str, m: nn.Module) -> bool:
    if _NOT_EMBED_NAME.search(name):
        return False
    return isinstance(m, nn.Embedding) or "embedding" in type(m).__name__.lower() or bool(_EMBED_NAME.search(name))


def _generic_parts(root: nn.Module, blocks_path: str) -> tuple[str, list[str], list[str]]:
    """Embeddings and final norm around the blocks at ``blocks_path``, found by structure and names."""
    emb: list[str] = []

    # The input embedding, widened to its largest ancestor that does not contain the blocks
    # (BERT's word_embeddings -> bert.embeddings, which also holds positions, types, LayerNorm).
    get_input = getattr(root, "get_input_embeddings", None)
    if callable(get_input):
        try:
            inp = get_input()
        except (NotImplementedError, AttributeError):
            inp = None
        path = _module_path(root, inp) if isinstance(inp, nn.Module) else None
        if path:
            while path and "." in path and not _contains(_parent(path), blocks_path):
                path = _parent(path)
            emb.append(path)

    # The trunk: the chain of modules from the base model down to the blocks' parent. Their other
    # children (with parameters) are embedding siblings (wpe, embed_positions, project_in, ...),
    # final norms (norm, ln_f, final_layer_norm) or head parts (pooler, project_out).
    base = _base_prefix(root)
    if not _contains(base, blocks_path):
        base = ""
    trunk = [base]
    rest = blocks_path[len(base):].lstrip(".").split(".")[:-1]
    for part in rest:
        trunk.append(_join(trunk[-1], part))
    norms: list[str] = []
    for t in trunk:
        for child_name, child in root.get_submodule(t).named_children():
            path = _join(t, child_name)
            if _contains(path, blocks_path) or any(_contains(e, path) or _contains(path, e) for e in emb):
                continue
            if _n_params(child) == 0:
                continue  # dropout, rotary embeddings: no parameters to train
            if _is_embedding(child_name, child):
                emb.append(path)
            elif _is_norm(child_name, child):
                norms.append(path)
    return blocks_path, emb, norms


def _contains(outer: str, inner: str) -> bool:
    """Whether the module at path ``outer`` is ``inner`` or one of its ancestors."""
    return outer == "" or inner == outer or inner.startswith(outer + ".")


def _complement(root: nn.Module, claimed: list[str]) -> list[str]:
    """Paths of the largest modules with parameters that hold none of ``claimed``: the head."""
    out: list[str] = []

    def walk(path: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            p = _join(path, child_name)
            if p in claimed:
                continue
            if any(_contains(p, c) for c in claimed):
                walk(p, child)
            elif _n_params(child) > 0:
                out.append(p)

    walk("", root)
    return out


def _unique_params(modules: Iterable[nn.Module], exclude: set[int] | None = None) -> list[nn.Parameter]:
    """Parameters of ``modules`` in order, each once, skipping ids in ``exclude``."""
    seen = set(exclude or ())
    out = []
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out
