"""Real quantization backends as modification specs, each through the library's own API (never re-implemented).

================================  ==========================================  =====================================
spec                              library call                                saved by ``quantize``
================================  ==========================================  =====================================
``bnb-nf4``, ``bnb-fp4``,         transformers ``BitsAndBytesConfig`` at      yes (bitsandbytes' serialization)
``bnb-int8``                      load (4-bit: blocks of 64, fp32 absmax)
``torchao-int8wo``                transformers ``TorchAoConfig(Int8Weight…)`` yes (torchao tensors in safetensors)
``hqq-int{1,2,3,4,8}-g{G}``       hqq ``AutoHQQHFModel.quantize_model``       no: HQQ's ``save_pretrained`` reloads
                                                                              with its weights missing
``quanto-int{2,4,8}``             optimum-quanto ``quantize`` + ``freeze``    no: transformers cannot serialize it
``ct-w{4,8}a16[-g{G}]``           llm-compressor ``oneshot`` with a           yes (compressed-tensors
                                  ``QuantizationModifier`` (RTN, symmetric)   ``pack-quantized``)
``gptq-w{4,8}a16[-g{G}]``         llm-compressor ``GPTQModifier`` on the      yes (compressed-tensors)
                                  calibration windows
================================  ==========================================  =====================================

``torchao-int4wo-g{G}`` is refused: torchao 0.18 has no CPU int4 weight-only path. Backends are optional
(``pip install "hemorrhage-hf[backends]"``); a spec whose backend is missing fails when it is parsed, before any model
loads. The output head is left unquantized, as each library does by default. ``gptq-*`` also needs the model's
tokenizer, as llm-compressor refuses to calibrate without one: ``apply_modification(..., tokenizer=...)``, else the
one ``model.name_or_path`` holds; a model with neither is refused before any weight changes.

A backend's model is built from the float reference without touching it: bitsandbytes and torchao quantize while
loading, so the reference is saved to a temporary folder and loaded back with the backend's config; the others
quantize a copy. A model that is already quantized is never copied (see :func:`quantized_backend`).

Example:
    >>> from hemorrhage_hf.modify import parse_spec
    >>> parse_spec("ct-w4a16-g64").config()  # doctest: +SKIP
    {'bits': 4, 'group_size': 64, 'scheme': 'symmetric int, fp32 scale per group (RTN)'}
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from ..atomic import atomic_write_text
from ..config_keys import MODIFICATION_ATTRIBUTE
from ..errors import BackendError, HemorrhageError, ModificationError, SpecError
from .base import Modification, parse_spec, register, target_linears
from .detect import quantized_backend, refuse_quantized
from .footprint import WeightFootprint, linear_like_modules

#: What to run where a backend is missing (constraints keep the pinned CPU torch).
INSTALL_HINT = 'pip install "hemorrhage-hf[backends]" -c constraints.txt'


def backend_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def require(module: str, distribution: str, spec: str) -> None:
    """Refuse a spec whose backend is not importable, naming what to install."""
    if importlib.util.find_spec(module) is None:
        raise BackendError(f"{spec} needs {distribution}, which is not installed: {INSTALL_HINT} (or {distribution})")


@contextlib.contextmanager
def backend_errors(backend: str, spec: str):
    """Turn a backend's own failure into a :class:`BackendError` naming the backend, its version and the spec."""
    try:
        yield
    except HemorrhageError:
        raise
    except (NotImplementedError, RuntimeError, ImportError, ValueError, TypeError, AttributeError) as error:
        raise BackendError(
            f"{backend} {backend_version(backend)} failed to quantize {spec}: {type(error).__name__}: {error}. "
            f"If a dependency is missing or too old: {INSTALL_HINT}"
        ) from error


def check_groups(model: PreTrainedModel, group_size: int | None, spec: str) -> None:
    """Refuse a group size that does not divide every target layer's input width (these backends need whole groups)."""
    if group_size is None:
        return
    for name, linear in target_linears(model).items():
        if linear.in_features % group_size:
            raise ModificationError(
                f"{spec}: group size {group_size} does not divide layer {name}'s {linear.in_features} input "
                "features; choose a group size that divides every layer's width (e.g. 32 or 64)"
            )


def check_bitsandbytes_saveable(model: torch.nn.Module) -> None:
    """bitsandbytes (0.50) repacks a 4-bit layer for its CPU kernel on the first CPU forward pass (its absmax turns
    bf16, in another layout); a checkpoint saved after that reloads with different weights. Refuse to save then."""
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            raise BackendError(
                f"this bitsandbytes 4-bit model has run on the CPU, which repacked layer {name} for the CPU kernel; "
                "a checkpoint saved now would reload with corrupted weights. Save it before running it (hemorrhage-hf "
                "quantize does), or quantize the float model again"
            )


class BackendQuantization(Modification):
    """A quantization made by a third-party library. Subclasses name the library and implement :meth:`quantize`."""

    #: Import name and pip distribution of the library.
    module: str
    distribution: str

    def __init__(self, bits: int, group_size: int | None = None):
        self.bits, self.group_size = bits, group_size
        require(self.module, self.distribution, self.spec)

    #: How the library stores a weight (for reports).
    scheme: str = ""

    def config(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "scheme": self.scheme}

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "backend": self.distribution,
            "version": backend_version(self.distribution),
            "simulated": False,
            **self.config(),
        }

    def check(self, model: PreTrainedModel) -> None:
        """Refuse options the backend would refuse, before any weight changes."""
        check_groups(model, self.group_size, self.spec)

    def apply(
        self, model: PreTrainedModel, calibration: torch.Tensor | None = None, *, progress: bool = False
    ) -> PreTrainedModel:
        self.check(model)
        with backend_errors(self.distribution, self.spec):
            self.quantize(model, calibration)
        return model

    def quantize(self, model: PreTrainedModel, calibration: torch.Tensor | None) -> None:
        """Quantize ``model`` in place with the library's own call."""
        raise NotImplementedError

    def footprint(self, model: PreTrainedModel) -> WeightFootprint | None:
        return None  # the backend's stored tensors are the truth: measure them


class LoadTimeBackend(BackendQuantization):
    """A backend that quantizes while transformers loads a checkpoint (a ``quantization_config``)."""

    builds_new_model = True

    def quantization_config(self, dtype: torch.dtype):
        raise NotImplementedError

    def apply(
        self, model: PreTrainedModel, calibration: torch.Tensor | None = None, *, progress: bool = False
    ) -> PreTrainedModel:
        raise ModificationError(
            f"{self.distribution} quantizes while a checkpoint loads, not in place: "
            f"apply_modification(model, {self.spec!r}) returns a new model"
        )

    def modified_copy(
        self, model: PreTrainedModel, calibration: torch.Tensor | None = None, *, progress: bool = False
    ) -> PreTrainedModel:
        """Save the float ``model`` to a temporary folder and load it back through the backend's config."""
        refuse_quantized(model, self.spec)
        self.check(model)
        with tempfile.TemporaryDirectory(prefix="hemorrhage-backend-") as folder:
            model.save_pretrained(folder)
            with backend_errors(self.distribution, self.spec):
                quantized = AutoModelForCausalLM.from_pretrained(
                    folder, dtype=model.dtype, quantization_config=self.quantization_config(model.dtype)
                )
        quantized.name_or_path = model.name_or_path  # its tokenizer lives where the reference's does
        quantized.config._name_or_path = model.config._name_or_path
        return quantized.eval()


class BitsAndBytes(LoadTimeBackend):
    module = distribution = "bitsandbytes"

    def __init__(self, kind: str):
        self.kind = kind
        super().__init__(8 if kind == "int8" else 4, None if kind == "int8" else 64)

    @property
    def spec(self) -> str:
        return f"bnb-{self.kind}"

    def check(self, model: PreTrainedModel) -> None:
        """Nothing to refuse: 4-bit blocks of 64 run over the flattened weight, so any layer width works."""

    @property
    def scheme(self) -> str:
        if self.kind == "int8":
            return "LLM.int8(): int8 rows with an fp32 absmax scale each; outlier columns (|x| > 6) in float"
        return f"{self.kind} code per block of 64, fp32 absmax per block"

    def save(self, model: PreTrainedModel, save_dir) -> None:
        check_bitsandbytes_saveable(model)
        model.save_pretrained(save_dir)

    def quantization_config(self, dtype: torch.dtype):
        from transformers import BitsAndBytesConfig

        if self.kind == "int8":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.kind, bnb_4bit_compute_dtype=dtype)


class TorchAo(LoadTimeBackend):
    module = distribution = "torchao"
    scheme = "int8 weight-only, one scale per output row"

    def __init__(self):
        super().__init__(8)

    @property
    def spec(self) -> str:
        return "torchao-int8wo"

    def quantization_config(self, dtype: torch.dtype):
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig())


class Hqq(BackendQuantization):
    module, distribution = "hqq", "hqq"
    saveable = False
    not_saveable_reason = "HQQ's save_pretrained checkpoints reload through transformers with their weights missing"
    scheme = "asymmetric, scale and zero point per group in the compute dtype (half-quadratic optimised)"

    def __init__(self, bits: int, group_size: int):
        if bits not in (1, 2, 3, 4, 8):
            raise SpecError(f"hqq supports 1, 2, 3, 4 or 8 bits, got {bits}")
        super().__init__(bits, group_size)

    @property
    def spec(self) -> str:
        return f"hqq-int{self.bits}-g{self.group_size}"

    def quantize(self, model: PreTrainedModel, calibration: torch.Tensor | None) -> None:
        from hqq.core.quantize import BaseQuantizeConfig
        from hqq.models.hf.base import AutoHQQHFModel

        device = str(next(model.parameters()).device)
        config = BaseQuantizeConfig(nbits=self.bits, group_size=self.group_size)
        AutoHQQHFModel.quantize_model(model, quant_config=config, compute_dtype=model.dtype, device=device)


class Quanto(BackendQuantization):
    module, distribution = "optimum.quanto", "optimum-quanto"
    saveable = False
    not_saveable_reason = "transformers cannot serialize optimum-quanto models"

    def __init__(self, bits: int):
        if bits not in (2, 4, 8):
            raise SpecError(f"quanto supports 2, 4 or 8 bits, got {bits}")
        super().__init__(bits)

    @property
    def spec(self) -> str:
        return f"quanto-int{self.bits}"

    @property
    def scheme(self) -> str:
        if self.bits == 8:
            return "symmetric int8, one scale per output row"
        return "asymmetric, scale and shift per group (quanto picks 128, or less until it divides the width)"

    def quantize(self, model: PreTrainedModel, calibration: torch.Tensor | None) -> None:
        from optimum.quanto import freeze, qint2, qint4, qint8, quantize

        head = next(name for name, module in model.named_modules() if module is model.get_output_embeddings())
        quantize(model, weights={2: qint2, 4: qint4, 8: qint8}[self.bits], exclude=[head])
        freeze(model)


class CompressedTensors(BackendQuantization):
    """llm-compressor's round-to-nearest ``QuantizationModifier``, stored as compressed-tensors."""

    module, distribution = "llmcompressor", "llmcompressor"
    method = "ct"

    def __init__(self, bits: int, group_size: int | None = None):
        if bits not in (4, 8):
            raise SpecError(f"{self.method} supports w4a16 or w8a16, got w{bits}a16")
        super().__init__(bits, group_size)
        require("compressed_tensors", "compressed-tensors", self.spec)

    @property
    def spec(self) -> str:
        return f"{self.method}-w{self.bits}a16{f'-g{self.group_size}' if self.group_size else ''}"

    @property
    def scheme(self) -> str:
        per = f"group of {self.group_size}" if self.group_size else "output row"
        return f"symmetric int, fp32 scale per {per}"

    def config_groups(self) -> dict:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        weights = QuantizationArgs(
            num_bits=self.bits,
            type="int",
            symmetric=True,
            strategy="group" if self.group_size else "channel",
            group_size=self.group_size,
        )
        return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}

    def modifier(self, head: str):
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return QuantizationModifier(config_groups=self.config_groups(), ignore=[head])

    def quantize(self, model: PreTrainedModel, calibration: torch.Tensor | None) -> None:
        from llmcompressor import oneshot

        head = next(name for name, module in model.named_modules() if module is model.get_output_embeddings())
        with _loadable_config(model):
            oneshot(model=model, recipe=self.modifier(head), **self.calibration_arguments(model, calibration))

    def calibration_arguments(self, model: PreTrainedModel, calibration: torch.Tensor | None) -> dict:
        return {}

    def save(self, model: PreTrainedModel, save_dir) -> None:
        """compressed-tensors' packed format (``pack-quantized``), which transformers loads back."""
        model.save_pretrained(save_dir, save_compressed=True)
        # llm-compressor rewrites config.json from the original checkpoint's: put the spec back.
        config_file = Path(save_dir) / "config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config[MODIFICATION_ATTRIBUTE] = getattr(model.config, MODIFICATION_ATTRIBUTE, self.spec)
        atomic_write_text(config_file, json.dumps(config, indent=2, sort_keys=True) + "\n")

    def footprint(self, model: PreTrainedModel) -> WeightFootprint | None:
        """What compressed-tensors stores: weights packed at ``bits`` into int32, plus each layer's scales (and
        zero points, for asymmetric schemes) as they are held."""
        total = None
        for module in linear_like_modules(model).values():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                continue
            n_weights = module.in_features * module.out_features
            extra = [getattr(module, name, None) for name in ("weight_scale", "weight_zero_point")]
            if scheme.weights.symmetric:
                extra = extra[:1]  # a symmetric scheme stores no zero point
            stored = n_weights * scheme.weights.num_bits // 8 + sum(
                t.numel() * t.element_size() for t in extra if isinstance(t, torch.Tensor)
            )
            part = WeightFootprint.from_bytes(n_weights, stored)
            total = part if total is None else total + part
        return total


class Gptq(CompressedTensors):
    """llm-compressor's ``GPTQModifier``: error-compensating rounding, one layer at a time, on calibration windows."""

    method = "gptq"
    needs_calibration = True
    #: The model's tokenizer: llm-compressor refuses to calibrate without a processor.
    tokenizer: PreTrainedTokenizerBase | None = None

    def with_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> Gptq:
        given = copy.copy(self)
        given.tokenizer = tokenizer
        return given

    def apply(
        self, model: PreTrainedModel, calibration: torch.Tensor | None = None, *, progress: bool = False
    ) -> PreTrainedModel:
        if self.tokenizer is None:  # found (or refused) before any weight changes
            return self.with_tokenizer(saved_tokenizer(model, self.spec)).apply(model, calibration, progress=progress)
        return super().apply(model, calibration, progress=progress)

    @property
    def scheme(self) -> str:
        return "GPTQ (Hessian-compensated rounding): " + super().scheme

    def modifier(self, head: str):
        from llmcompressor.modifiers.quantization import GPTQModifier

        return GPTQModifier(config_groups=self.config_groups(), ignore=[head])

    def calibration_arguments(self, model: PreTrainedModel, calibration: torch.Tensor | None) -> dict:
        from datasets import Dataset

        rows = calibration.tolist()
        dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(row) for row in rows]})
        return dict(
            dataset=dataset,
            processor=self.tokenizer,
            num_calibration_samples=len(rows),
            max_seq_length=calibration.shape[1],
        )


def saved_tokenizer(model: PreTrainedModel, spec: str) -> PreTrainedTokenizerBase:
    """The tokenizer ``model.name_or_path`` names (a folder, a .gguf file or a Hub id); :class:`BackendError` saying
    what to pass where there is none."""
    from ..models import load_tokenizer

    name = model.name_or_path
    problem = "the model has no name_or_path to load it from"
    if name:
        try:
            return load_tokenizer(name)
        except (HemorrhageError, OSError, ValueError) as error:
            problem = f"none could be loaded from its name_or_path {name!r} ({type(error).__name__}: {error})"
    raise BackendError(
        f"{spec} calibrates through llm-compressor, which needs the model's tokenizer, and {problem}. Pass it: "
        f"apply_modification(model, {spec!r}, calibration=..., tokenizer=tokenizer) (compare(..., tokenizer=...) "
        "passes it on), or load the model from a folder or Hub id that holds its tokenizer"
    )


@contextlib.contextmanager
def _loadable_config(model: PreTrainedModel):
    """llm-compressor re-reads the model's config from ``name_or_path``: point it at a folder that has one for
    models built in memory."""
    if (Path(model.config._name_or_path or "") / "config.json").is_file():
        yield
        return
    with tempfile.TemporaryDirectory(prefix="hemorrhage-config-") as folder:
        model.config.save_pretrained(folder)
        original = model.config._name_or_path
        model.config._name_or_path = folder
        try:
            yield
        finally:
            model.config._name_or_path = original


def describe_model(model: PreTrainedModel, modification: Modification | None = None) -> dict:
    """What a report says about the modification: spec, backend and version, config, footprint of the Linear weights.

    For a checkpoint loaded from disk without a hemorrhage-hf spec, the backend comes from its ``quantization_config``.
    """
    from .footprint import linear_footprint

    recorded = getattr(model.config, MODIFICATION_ATTRIBUTE, None)
    if modification is None and isinstance(recorded, str):
        modification = parse_spec(recorded)  # a checkpoint hemorrhage-hf (or its quantize command) saved
    if modification is not None:
        details = modification.describe()
    else:
        backend = quantized_backend(model)
        details = {"spec": None, "backend": backend or "none (float)", "simulated": False}
        if backend:
            details["version"] = backend_version(_DISTRIBUTIONS.get(backend, backend))
            config = model.config.quantization_config
            details["quantization_config"] = config if isinstance(config, dict) else config.to_dict()
    details["footprint"] = linear_footprint(model, modification).to_dict()
    return details


#: transformers' ``quant_method`` → pip distribution, where they differ.
_DISTRIBUTIONS = {"quanto": "optimum-quanto", "compressed-tensors": "compressed-tensors", "torchao": "torchao"}


@register(r"bnb-(?P<kind>nf4|fp4|int8)", example="bnb-nf4")
def _bitsandbytes(match) -> BitsAndBytes:
    return BitsAndBytes(match["kind"])


@register(r"torchao-int8wo", example="torchao-int8wo")
def _torchao(match) -> TorchAo:
    return TorchAo()


@register(r"torchao-int4wo(?:-g\d+)?", example="torchao-int4wo-g64")
def _torchao_int4(match) -> TorchAo:
    raise BackendError(
        "torchao 0.18 has no CPU path for int4 weight-only quantization (it needs CUDA, mslk or bf16 tile layouts); "
        "for 4 bits on CPU use hqq-int4-g64, quanto-int4, ct-w4a16-g64 or bnb-nf4"
    )


@register(r"hqq-int(?P<bits>\d+)-g(?P<group>\d+)", example="hqq-int4-g64")
def _hqq(match) -> Hqq:
    return Hqq(int(match["bits"]), int(match["group"]))


@register(r"quanto-int(?P<bits>\d+)", example="quanto-int4")
def _quanto(match) -> Quanto:
    return Quanto(int(match["bits"]))


@register(r"(?P<method>ct|gptq)-w(?P<bits>\d+)a16(?:-g(?P<group>\d+))?", example="ct-w4a16-g64")
def _compressed_tensors(match) -> CompressedTensors:
    group = int(match["group"]) if match["group"] else None
    return (Gptq if match["method"] == "gptq" else CompressedTensors)(int(match["bits"]), group)
