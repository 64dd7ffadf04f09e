"""A causal LM's output head apart from the model: its logits recomputed from the hidden states that enter it.

A causal LM's logits are a fixed function of a small vector: ``logits = head(h)``, where ``h`` is the final
normalised hidden state and ``head`` a linear map followed, in some families, by a known transform (Cohere's
``logit_scale``, Granite's ``logits_scaling``, Gemma 2's final soft-capping). Keeping ``h`` instead of the logits is
what makes the exact reference store small (:mod:`hemorrhage_hf.measurement.refstore`), and computing the logits a
block of rows at a time (:class:`HeadRows`) keeps a window's full-vocabulary logits (~100 MB for 512 tokens of a 49k
vocabulary) from ever existing whole.

Example:
    >>> import torch
    >>> from hemorrhage_hf.measurement.head import OutputHead
    >>> head = OutputHead(weight=torch.eye(3), softcap=2.0)
    >>> [round(x, 4) for x in head(torch.tensor([[10.0, 0.0, -1.0]]))[0].tolist()]  # 2·tanh(logit / 2)
    [1.9998, 0.0, -0.9242]
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from ..errors import HemorrhageError

#: ``head(h)`` must reproduce the model's logits within this, relative to the largest logit, or the model is refused
HEAD_CHECK_TOLERANCE = 1e-4


class UnknownHeadError(HemorrhageError):
    """The model's logits are not its output head applied to its final hidden state under a known transform."""


@dataclass(frozen=True)
class OutputHead:
    """``logits = softcap · tanh((scale · (h Wᵀ + b)) / softcap)``; no soft-capping where ``softcap`` is None.

    Example:
        >>> import torch
        >>> OutputHead(weight=torch.ones(2, 3), scale=0.5)(torch.ones(1, 3)).tolist()
        [[1.5, 1.5]]
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, model: PreTrainedModel) -> OutputHead:
        """The head of a causal LM with the post-head transforms transformers' families apply after it."""
        head = model.get_output_embeddings()
        if type(head) is not torch.nn.Linear:
            raise UnknownHeadError(
                f"{type(model).__name__}'s output head is a {type(head).__name__}, not a plain Linear: its logits "
                "cannot be recomputed from its hidden states"
            )
        if type(head.weight.data) is not torch.Tensor:  # torchao, quanto: a quantized tensor subclass
            raise UnknownHeadError(
                f"{type(model).__name__}'s output head holds a {type(head.weight.data).__name__} weight, not a plain "
                "tensor: its logits cannot be recomputed from its hidden states"
            )
        config = model.config.get_text_config()
        scale = float(getattr(config, "logit_scale", None) or 1.0)  # Cohere: logits · logit_scale
        if getattr(config, "logits_scaling", None):  # Granite: logits / logits_scaling
            scale /= float(config.logits_scaling)
        softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2 and 3
        bias = head.bias.detach() if head.bias is not None else None
        return cls(head.weight.detach(), bias, scale, float(softcap) if softcap else None)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(hidden.to(self.weight.dtype), self.weight, self.bias)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def check(self, hidden: torch.Tensor, logits: torch.Tensor, model: PreTrainedModel) -> None:
        """Raise :class:`UnknownHeadError` unless this head maps ``hidden`` to ``model``'s own ``logits`` (any
        positions; the last one of a window suffices), within :data:`HEAD_CHECK_TOLERANCE` of the largest logit."""
        error = (self(hidden).float() - logits.float()).abs().max().item()
        allowed = HEAD_CHECK_TOLERANCE * max(1.0, logits.float().abs().max().item())
        if not error <= allowed:
            raise UnknownHeadError(
                f"{type(model).__name__}'s logits are not its output head applied to its final hidden state with "
                f"the known transforms (logit scaling, final soft-capping): they differ by {error:.3g}. Its "
                "post-head transform is unknown, so its logits cannot be recomputed from its hidden states; "
                "measure it against a top-k cache or the live reference instead"
            )

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def fingerprint(self) -> str:
        """SHA-256 of the weight, bias and transform: two heads compute the same logits iff this matches."""
        digest = hashlib.sha256(json.dumps({"scale": self.scale, "softcap": self.softcap}).encode())
        for tensor in (self.weight, self.bias):
            if tensor is not None:
                tensor = tensor.detach().cpu().contiguous()
                digest.update(f"{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.view(torch.uint8).numpy().data)
        return digest.hexdigest()

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"weight": self.weight.contiguous()}
        if self.bias is not None:
            tensors["bias"] = self.bias.contiguous()
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], transform: dict) -> OutputHead:
        return cls(tensors["weight"], tensors.get("bias"), transform["scale"], transform["softcap"])


class HeadInputs:
    """While open, keeps what enters ``model``'s output head (after any scaling the model applies before it) and lets
    the head compute the last position alone: the caller recomputes the logits it needs from :attr:`value`, and the
    last position's logits (what the model returns) are what :meth:`OutputHead.check` compares with.

    Example:
        >>> with HeadInputs(model) as inputs:  # doctest: +SKIP
        ...     last_logits = model(input_ids).logits  # [B, 1, V]
        >>> inputs.value.shape  # doctest: +SKIP
        torch.Size([B, T, d])
    """

    def __init__(self, model: PreTrainedModel):
        self.value: torch.Tensor | None = None
        self._model = model
        self._handle = None

    def __enter__(self) -> HeadInputs:
        self._handle = self._model.get_output_embeddings().register_forward_pre_hook(self._keep)
        return self

    def __exit__(self, *exc_info) -> None:
        self._handle.remove()

    def _keep(self, module, args) -> tuple:
        self.value = args[0]
        return (args[0][..., -1:, :], *args[1:])

    def last(self) -> torch.Tensor:
        """The head input at the last position, ``[B, 1, d]``: what the model's returned logits were computed from."""
        return self.value[..., -1:, :]


@dataclass(frozen=True)
class HeadRows:
    """A model's logits at the rows of ``hidden`` ``[n, d]``, computed only for the rows sliced out.

    Example:
        >>> rows = HeadRows(OutputHead(weight=torch.eye(2)), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        >>> rows.shape, rows[1:].tolist()
        (torch.Size([2, 2]), [[3.0, 4.0]])
    """

    head: OutputHead
    hidden: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.hidden), self.head.vocab_size))

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.head(self.hidden[rows])
