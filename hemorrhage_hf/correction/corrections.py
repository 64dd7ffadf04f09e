"""The correction families: one small class each, owning its tensors, its identity, its penalty and its term.

A correction maps the modified model's scores ``z`` (``[..., vocab]``) and the token each position has just read
(``previous_ids``, ``[...]``) to corrected scores. Each family adds one term; a family at its identity values leaves
``z`` bit-for-bit unchanged. They act in three stages, in this order::

    z  = z + state_network(z)                                             # STATE: corrects the state behind z
    z' = z · exp(log_inverse_temperature + entropy_slope · (H(z) − c))    # SCALE: a temperature
    z' = z' + token_bias + previous_token[previous_ids] + state_bias(z)   # ADD: every other family

Each family's tensors are stored under their own names (the safetensors layout of a saved processor);
:class:`CorrectionParameters` holds the families of one correction and applies them.

Example:
    >>> import torch
    >>> from hemorrhage_hf.correction.corrections import CorrectionParameters, TokenBias
    >>> parameters = CorrectionParameters(4, [TokenBias(torch.tensor([0.0, 0.0, 5.0, 0.0]))])
    >>> parameters.families, parameters.apply(torch.zeros(1, 4), torch.tensor([1]))
    (('token_bias',), tensor([[0., 0., 5., 0.]]))
    >>> CorrectionParameters.identity(("temperature", "token_bias"), vocab_size=4).is_identity()
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import ClassVar, NamedTuple

import torch

from ..measurement.divergence import log_probs
from .network import DEFAULT_NETWORK_RANK, DEFAULT_NETWORK_WIDTH, READ_TOKENS

STATE, SCALE, ADD = 0, 1, 2


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` over the last dimension; -inf scores count as probability 0."""
    logprobs = log_probs(logits)
    probs = logprobs.exp()
    return -torch.where(probs > 0, probs * logprobs, torch.zeros_like(probs)).sum(-1)


def state_features(scores: torch.Tensor) -> torch.Tensor:
    """Scores centred over the vocabulary (a constant shift of all scores changes nothing). A -inf score (a token an
    earlier processor banned) reads as the row's lowest finite score, so it cannot turn a state term into NaN."""
    if not torch.isfinite(scores).all():
        finite = torch.isfinite(scores)
        floor = torch.where(finite, scores, torch.inf).amin(-1, keepdim=True)
        scores = torch.where(finite, scores, floor)
    return scores - scores.mean(-1, keepdim=True)


class LinearTerms(NamedTuple):
    """A family's part of ``z · exp(log_scale) + bias + factors @ basis`` over N positions, the form the L-BFGS fit
    differentiates (:func:`~hemorrhage_hf.correction.ops.fit_correction`); ``None`` where the family adds nothing."""

    log_scale: torch.Tensor | None = None  # [] or [N]
    bias: torch.Tensor | None = None  # [vocab]
    factors: torch.Tensor | None = None  # [N, k]
    basis: torch.Tensor | None = None  # [k, vocab]


@dataclass
class Family:
    """One correction family: its tensors are its dataclass fields, named as they are saved."""

    name: ClassVar[str]
    stage: ClassVar[int] = ADD

    @classmethod
    def tensor_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.tensor_names()}

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> Family:
        return replace(self, **{name: function(tensor) for name, tensor in self.tensors().items()})

    def shapes(self, vocab_size: int) -> dict[str, tuple[int, ...]]:
        """The shape each tensor must have, given the vocabulary (and the family's own sizes)."""
        raise NotImplementedError

    def identity_tensors(self) -> list[torch.Tensor]:
        """The tensors that are zero exactly when the family leaves the scores unchanged."""
        return list(self.tensors().values())

    def is_identity(self) -> bool:
        return not any(tensor.any() for tensor in self.identity_tensors())

    def trainable(self) -> list[torch.Tensor]:
        """What the L-BFGS fit optimises (:func:`~hemorrhage_hf.correction.ops.fit_correction`); none for the
        families fitted otherwise."""
        return []

    def penalty(self) -> torch.Tensor:
        """What the L-BFGS fit adds, times its regularization, to the KL."""
        return torch.zeros(())

    def term(self, scores: torch.Tensor, previous_ids: torch.Tensor) -> torch.Tensor:
        """What the family adds to the scores (ADD and STATE stages), read from the (state-corrected) ``scores``."""
        raise NotImplementedError

    def linear_terms(self, previous_ids: torch.Tensor, scores_entropy: torch.Tensor) -> LinearTerms:
        """The family's part of the L-BFGS fit's form, at positions that read ``previous_ids`` (``[N]``) with scores
        of entropy ``scores_entropy`` (``[N]``); only the families that fit trains have one."""
        raise NotImplementedError(f"the {self.name} family is not fitted by L-BFGS")

    def check(self, vocab_size: int) -> None:
        """Raise ValueError when the tensors do not fit together (a corrupted or hand-edited file)."""
        for name, expected in self.shapes(vocab_size).items():
            tensor = getattr(self, name)
            if tuple(tensor.shape) != expected:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected}")
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"{name} holds NaN or inf values")


@dataclass
class Temperature(Family):
    """A global inverse temperature, scaling every score: ``z · exp(log_inverse_temperature)``."""

    name: ClassVar[str] = "temperature"
    stage: ClassVar[int] = SCALE
    log_inverse_temperature: torch.Tensor  # [] ; 0 is the identity

    @classmethod
    def identity(cls, **_) -> Temperature:
        return cls(torch.zeros(()))

    def shapes(self, vocab_size: int) -> dict[str, tuple[int, ...]]:
        return {"log_inverse_temperature": ()}

    def trainable(self) -> list[torch.Tensor]:
        return [self.log_inverse_temperature]

    def log_scale(self, scores_entropy: torch.Tensor | None) -> torch.Tensor:
        """Log of the inverse temperature: ``[]``, or ``[...]`` per position where it depends on the entropy."""
        return self.log_inverse_temperature

    def linear_terms(self, previous_ids: torch.Tensor, scores_entropy: torch.Tensor) -> LinearTerms:
        return LinearTerms(log_scale=self.log_scale(scores_entropy))


@dataclass
class EntropyTemperature(Temperature):
    """An inverse temperature that moves with the entropy of the scores' own distribution: flat distributions may
    want sharpening where peaked ones want flattening. It includes the global temperature."""

    name: ClassVar[str] = "entropy_temperature"
    entropy_slope: torch.Tensor  # [] ; 0 is the identity
    entropy_center: torch.Tensor  # [] ; the mean entropy on the fit text (a constant, not fitted)

    @classmethod
    def identity(cls, *, entropy_center: float = 0.0, **_) -> EntropyTemperature:
        return cls(torch.zeros(()), torch.zeros(()), torch.tensor(float(entropy_center)))

    def shapes(self, vocab_size: int) -> dict[str, tuple[int, ...]]:
        return {"log_inverse_temperature": (), "entropy_slope": (), "entropy_center": ()}

    def identity_tensors(self) -> list[torch.Tensor]:
        return [self.log_inverse_temperature, self.entropy_slope]

    def trainable(self) -> list[torch.Tensor]:
        return [self.log_inverse_temperature, self.entropy_slope]

    def log_scale(self, scores_entropy: torch.Tensor | None) -> torch.Tensor:
        return self.log_inverse_temperature + self.entropy_slope * (scores_entropy - self.entropy_center)


@dataclass
class TokenBias(Family):
    """A bias per vocabulary entry. It sees little data per entry, so the fit keeps it small (its squared norm is
    penalised)."""

    name: ClassVar[str] = "token_bias"
    token_bias: torch.Tensor  # [vocab]

    @classmethod
    def identity(cls, *, vocab_size: int, **_) -> TokenBias:
        return cls(torch.zeros(vocab_size))

    def shapes(self, vocab_size: int) -> dict[str, tuple[int, ...]]:
        return {"token_bias": (vocab_size,)}

    def trainable(self) -> list[torch.Tensor]:
        return [self.token_bias]

    def penalty(self) -> torch.Tensor:
        return (self.token_bias * self.token_bias).sum()

    def term(self, scores: torch.Tensor, previous_ids: torch.Tensor) -> torch.Tensor:
        return self.token_bias

    def linear_terms(self, previous_ids: torch.Tensor, scores_entropy: torch.Tensor) -> LinearTerms:
        return LinearTerms(bias=self.token_bias)


@dataclass
class PreviousTokenBias(Family):
    """A low-rank bias keyed by the token just read: ``previous_token_factors[previous_ids] @ previous_token_basis``.

    It starts with a zero first factor and a random second one: the bias is then zero, yet the gradient of the first
    factor is not (two zero factors would be a saddle point the fit never leaves). The second factor's entries are
    of unit size, the scale of a logit: scaled down by √vocab, the first step's change of the loss was smaller than
    fp32 resolves and the fit never left its start. It is penalised as the product ‖factors @ basis‖², which, unlike
    penalising each factor, has zero gradient at the identity."""

    name: ClassVar[str] = "previous_token"
    previous_token_factors: torch.Tensor  # [vocab, rank]; zero rows for tokens never read
    previous_token_basis: torch.Tensor  # [rank, vocab]

    @classmethod
    def identity(cls, *, vocab_size: int, rank: int = 8, seed: int = 0, **_) -> PreviousTokenBias:
        generator = torch.Generator().manual_seed(seed)
        return cls(torch.zeros(vocab_size, rank), torch.randn(rank, vocab_size, generator=generator))

    @property
    def rank(self) -> int:
        return self.previous_token_factors.shape[1]

    def shapes(self, vocab_size: int) -> dict[str, tuple[int, ...]]:
        return {"previous_token_factors": (vocab_size, self.rank), "previous_token_basis": (self.rank, vocab_size)}

    def identity_tensors(self) -> list[torch.Tensor]:
        return [self.previous_token_factors]

    def trainable(self) -> list[torch.Tensor]:
        return [self.previous_token_factors, self.previous_token_basis]

    def penalty(self) -> torch.Tensor:
        factors, basis = self.previous_token_factors, self.previous_token_basis
        return ((factors.T @ factors) * (basis @ basis.T)).sum()

    def term(self, scores: torch.Tensor, previous_ids: torch.Tensor) -> torch.Tensor:
        return self.previous_token_factors[previous_ids] @ self.previous_token_basis

    def linear_terms(self, previous_ids: torch.Tensor, scores_entropy: torch.Tensor) -> LinearTerms:
        return LinearTerms(factors=self.previous_token_factors[previous_ids], basis=self.previous_token_basis)


@dataclass
class StateBias(Family):
    """A rank-``r`` affine correction of the modified model's final hidden state, read from its own centred scores
    and written back through its output head: ``(centred z @ state_bias_in) @ state_bias_out + state_bias_offset``.
    Fitted in closed form in the hidden space (:class:`~hemorrhage_hf.correction.ops.HiddenStateFactors`), so the
    L-BFGS fit holds it fixed."""

    name: ClassVar[str] = "state_bias"
    state_bias_in: torch.Tensor  # [vocab, rank]; 0 is the identity
    state_bias_out: torch.Tensor  # [rank, vocab]
    state_bias_offset: torch.Tensor  # [vocab]; the map's constant part, written through the head

    @classmethod
    def identity(cls, *, vocab_size: int, rank: int = 8, **_) -> StateBias:
        return cls(torch.zeros(vocab_size, rank), torch.zeros(rank, vocab_size), torch.zeros(vocab_size))

    @property
    def rank(self) -> int:
        return self.state_bias_in.shape[1]

    def shapes(self, vocab_size: int) -> dict[str, tuple[int, ...]]:
        return {
            "state_bias_in": (vocab_size, self.rank),
            "state_bias_out": (self.rank, vocab_size),
            "state_bias_offset": (vocab_size,),
        }

    def identity_tensors(self) -> list[torch.Tensor]:
        return [self.state_bias_in, self.state_bias_offset]

    def term(self, scores: torch.Tensor, previous_ids: torch.Tensor) -> torch.Tensor:
        return (state_features(scores) @ self.state_bias_in) @ self.state_bias_out + self.state_bias_offset


@dataclass
class StateNetworkCorrection(Family):
    """The ``state_network`` (:mod:`~hemorrhage_hf.correction.network`) folded into vocabulary space: the state is
    read from the scores of a few thousand tokens, mapped, and written back through the head. It acts first: every
    other family reads the scores it corrected (they are fitted on them). Trained apart, on states, never by the
    L-BFGS fit.

    A row where an earlier processor banned one of the read tokens (a score of -inf) gets no correction: its state
    can no longer be read exactly."""

    name: ClassVar[str] = "state_network"
    stage: ClassVar[int] = STATE
    state_network_read_ids: torch.Tensor  # [n] int64: the tokens whose scores the state is read from
    state_network_in: torch.Tensor  # [n, r]: reads the network's input from those scores
    state_network_in_bias: torch.Tensor  # [r]
    state_network_linear: torch.Tensor  # [k, r]; zero (with down and bias) is the identity
    state_network_up: torch.Tensor  # [width, r]
    state_network_up_bias: torch.Tensor  # [width]
    state_network_down: torch.Tensor  # [k, width]
    state_network_bias: torch.Tensor  # [k]
    state_network_out: torch.Tensor  # [k, vocab]: writes through the output head; k ≤ r

    @classmethod
    def identity(
        cls,
        *,
        vocab_size: int,
        network_shape: tuple[int, int] = (DEFAULT_NETWORK_RANK, DEFAULT_NETWORK_WIDTH),
        network_write_rank: int | None = None,
        **_,
    ) -> StateNetworkCorrection:
        """All zeros but the read ids: a fit trains the network apart and never starts from here."""
        rank, width = network_shape
        write_rank = network_write_rank or rank
        read_ids = torch.arange(min(READ_TOKENS, vocab_size))
        shapes = cls._shapes(len(read_ids), rank, width, write_rank, vocab_size)
        return cls(read_ids, *(torch.zeros(shape) for shape in list(shapes.values())[1:]))

    @staticmethod
    def _shapes(read: int, rank: int, width: int, write_rank: int, vocab_size: int) -> dict[str, tuple[int, ...]]:
        return {
            "state_network_read_ids": (read,),
            "state_network_in": (read, rank),
            "state_network_in_bias": (rank,),
            "state_network_linear": (write_rank, rank),
            "state_network_up": (width, rank),
            "state_network_up_bias": (width,),
            "state_network_down": (write_rank, width),
            "state_network_bias": (write_rank,),
            "state_network_out": (write_rank, vocab_size),
        }

    @property
    def shape(self) -> tuple[int, int]:
        """(rank, width)."""
        width, rank = self.state_network_up.shape
        return rank, width

    @property
    def write_rank(self) -> int:
        """Directions the network writes along: its rank, or fewer where its fit cut the write."""
        return self.state_network_out.shape[0]

    def shapes(self, vocab_size: int) -> dict[str, tuple[int, ...]]:
        return self._shapes(len(self.state_network_read_ids), *self.shape, self.write_rank, vocab_size)

    def identity_tensors(self) -> list[torch.Tensor]:
        return [self.state_network_linear, self.state_network_down, self.state_network_bias]

    def check(self, vocab_size: int) -> None:
        super().check(vocab_size)
        ids = self.state_network_read_ids
        if ids.dtype != torch.long or (len(ids) and (ids.min() < 0 or ids.max() >= vocab_size)):
            raise ValueError(f"state_network_read_ids must be int64 token ids below {vocab_size}")

    def term(self, scores: torch.Tensor, previous_ids: torch.Tensor | None = None) -> torch.Tensor:
        read_scores = scores[..., self.state_network_read_ids]
        readable = torch.isfinite(read_scores).all(-1, keepdim=True)
        if not readable.all():
            read_scores = torch.where(readable, read_scores, torch.zeros_like(read_scores))
        read = read_scores @ self.state_network_in + self.state_network_in_bias
        hidden = torch.nn.functional.gelu(read @ self.state_network_up.T + self.state_network_up_bias)
        change = read @ self.state_network_linear.T + hidden @ self.state_network_down.T
        term = (change + self.state_network_bias) @ self.state_network_out
        return term if readable.all() else term * readable


#: Every family, cheapest first (the order a processor lists them in). ``entropy_temperature`` includes the global
#: temperature; ``state_network`` is fitted on states, not logits.
FAMILY_CLASSES: tuple[type[Family], ...] = (
    Temperature,
    EntropyTemperature,
    TokenBias,
    PreviousTokenBias,
    StateBias,
    StateNetworkCorrection,
)
FAMILIES = tuple(family.name for family in FAMILY_CLASSES)
_BY_NAME = {family.name: family for family in FAMILY_CLASSES}


class CorrectionParameters:
    """The families of one correction, and the function they apply together.

    Build it from family objects, from saved tensors (:meth:`from_tensors`), or at the identity (:meth:`identity`).
    """

    def __init__(self, vocab_size: int, families: Iterable[Family] = ()):
        self.vocab_size = vocab_size
        by_name = {family.name: family for family in families}
        if "temperature" in by_name and "entropy_temperature" in by_name:
            raise ValueError("entropy_temperature includes the global temperature: ask for one of them")
        self._families = [by_name[name] for name in FAMILIES if name in by_name]

    def __repr__(self) -> str:
        return f"CorrectionParameters(vocab_size={self.vocab_size}, families={list(self.families)})"

    @classmethod
    def identity(cls, families: Iterable[str], *, vocab_size: int, **sizes) -> CorrectionParameters:
        """Every family of ``families`` at its identity values, ready to be fitted; ``sizes`` are the families' own
        (``rank``, ``entropy_center``, ``seed``, ``network_shape``, ``network_write_rank``)."""
        families = set(families)
        unknown = families - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown correction families {sorted(unknown)}; choose from {FAMILIES}")
        if {"temperature", "entropy_temperature"} <= families:
            families.discard("temperature")  # the entropy-dependent temperature includes the global one
        return cls(vocab_size, [_BY_NAME[name].identity(vocab_size=vocab_size, **sizes) for name in families])

    @classmethod
    def from_tensors(cls, vocab_size: int, tensors: dict[str, torch.Tensor]) -> CorrectionParameters:
        """The families whose tensors ``tensors`` holds, by their saved names (raise ValueError for a family with
        some of its tensors missing, or a tensor no family owns)."""
        remaining, families = dict(tensors), []
        for family in reversed(FAMILY_CLASSES):  # the entropy temperature claims its three before the temperature
            names = family.tensor_names()
            present = [name for name in names if name in remaining]
            if present and len(present) < len(names):
                if any(set(other.tensor_names()) == set(present) for other in FAMILY_CLASSES):
                    continue  # a family whose tensors are a subset of this one's: the global temperature
                raise ValueError(f"{', '.join(names)} come together; only {', '.join(present)} are there")
            if present:
                families.append(family(**{name: remaining.pop(name) for name in names}))
        if remaining:
            raise ValueError(f"tensors {sorted(remaining)} belong to no correction family")
        return cls(vocab_size, families)

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(family.name for family in self._families)

    def get(self, name: str) -> Family | None:
        return next((family for family in self._families if family.name == name), None)

    def __iter__(self):
        return iter(self._families)

    def with_families(self, families: Iterable[Family]) -> CorrectionParameters:
        """These families with ``families`` added (replacing any of the same name)."""
        added = list(families)
        names = {family.name for family in added}
        return CorrectionParameters(self.vocab_size, [f for f in self._families if f.name not in names] + added)

    @property
    def rank(self) -> int:
        """Rank of the low-rank biases (they share it); 0 without any."""
        low_rank = self.get("previous_token") or self.get("state_bias")
        return 0 if low_rank is None else low_rank.rank

    @property
    def network(self) -> StateNetworkCorrection | None:
        return self.get("state_network")

    def is_identity(self) -> bool:
        """Every family at its identity values (what a fit on two identical models returns)."""
        return all(family.is_identity() for family in self._families)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by its saved name (the safetensors layout)."""
        return {name: tensor for family in self._families for name, tensor in family.tensors().items()}

    def trainable(self) -> list[torch.Tensor]:
        return [tensor for family in self._families for tensor in family.trainable()]

    def penalty(self) -> torch.Tensor:
        return sum((family.penalty() for family in self._families), torch.zeros(()))

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> CorrectionParameters:
        """A copy with ``function`` applied to every tensor (``.to(device)``, ``.detach()``...)."""
        return CorrectionParameters(self.vocab_size, [family.map(function) for family in self._families])

    def validate(self) -> None:
        """Raise ValueError when the tensors do not fit together (a corrupted or hand-edited file)."""
        ranks = {family.rank for family in self._families if isinstance(family, PreviousTokenBias | StateBias)}
        if len(ranks) > 1:
            raise ValueError(f"the low-rank biases share one rank, got {sorted(ranks)}")
        for family in self._families:
            family.check(self.vocab_size)

    def apply(
        self, scores: torch.Tensor, previous_ids: torch.Tensor, *, scores_entropy: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Corrected fp32 scores ``[..., vocab]``; ``previous_ids[...]`` is the token each position has just read.

        Works for one generation step (``[batch, vocab]`` with ``input_ids[:, -1]``) and for whole sequences
        (``[batch, time, vocab]`` with ``input_ids``) alike, so measured figures use exactly the math of generation.
        ``scores_entropy`` (``[...]``) spares recomputing :func:`entropy` of ``scores`` where it is already known.
        """
        scores = scores.float()
        for family in self._stage(STATE):
            scores = scores + family.term(scores, previous_ids)
            scores_entropy = None
        corrected = scores
        for family in self._stage(SCALE):
            if isinstance(family, EntropyTemperature) and scores_entropy is None:
                scores_entropy = entropy(scores)
            corrected = corrected * family.log_scale(scores_entropy).exp().unsqueeze(-1)
        for family in self._stage(ADD):
            corrected = corrected + family.term(scores, previous_ids)
        return corrected

    def _stage(self, stage: int) -> Sequence[Family]:
        return [family for family in self._families if family.stage == stage]
