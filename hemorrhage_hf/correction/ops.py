"""Pure tensor functions of decoding correction: the correction of next-token scores, its loss, and its fit.

A correction maps the modified model's scores ``z`` (``[..., vocab]``) and the token each position has just seen
(``previous_ids``, ``[...]``) to corrected scores. Each family adds one term; a family that is absent, or present
with its identity values (zero scalars, zero bias, zero first factors), leaves ``z`` bit-for-bit unchanged::

    z  = z + state_network(z)                                                             # first, if present
    s  = log_inverse_temperature + entropy_slope · (H(softmax z) − entropy_center)        # temperature families
    z' = z · exp(s) + token_bias                                                          # per-token bias
         + previous_token_factors[previous_ids] @ previous_token_basis                    # low-rank, previous token
         + ((z − mean z) @ state_bias_in) @ state_bias_out + state_bias_offset            # low-rank, own logits

``state_bias`` reads the modified model's own logits: since they are a linear image of its final hidden state, it
is a rank-``r`` affine correction of that state. It is fitted first, in closed form in the hidden space
(:class:`HiddenStateFactors`, (2 ``r`` + 1) × hidden numbers), and stored as the vocabulary-space factors above, so the
processor needs no model; the other families are then fitted around it by L-BFGS on the KL.
``state_network`` (:mod:`hemorrhage_hf.correction.network`) is a small non-linear map of the same state, trained
on states of much more text before everything else; the other families are fitted on the scores it corrected.

Example:
    >>> import torch
    >>> from hemorrhage_hf.correction.ops import CorrectionParameters, apply_correction
    >>> parameters = CorrectionParameters.identity(("temperature", "token_bias"), vocab_size=4)
    >>> scores = torch.tensor([[1.0, 2.0, 3.0, float("-inf")]])
    >>> torch.equal(apply_correction(scores, torch.tensor([0]), parameters), scores)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch

from ..measurement.divergence import kl_divergence, log_probs
from .network import DEFAULT_NETWORK_RANK, DEFAULT_NETWORK_WIDTH, READ_TOKENS

#: Every correction family, cheapest first. ``entropy_temperature`` includes the global temperature.
#: ``state_network`` is fitted on states, not logits (:mod:`hemorrhage_hf.correction.network`).
FAMILIES = ("temperature", "entropy_temperature", "token_bias", "previous_token", "state_bias", "state_network")
#: The tensors of the ``state_network`` family, in the order of :class:`CorrectionParameters`.
NETWORK_TENSORS = (
    "state_network_read_ids",
    "state_network_in",
    "state_network_in_bias",
    "state_network_linear",
    "state_network_up",
    "state_network_up_bias",
    "state_network_down",
    "state_network_bias",
    "state_network_out",
)
#: Ridge penalties the state bias chooses from, as multiples of the hidden state's mean variance. SmolLM2's best on
#: held-out text lay between 0.5 and 4 (int4-g64 and wanda-50); a model that differs from its reference by an exact
#: linear map of the state wants almost none.
SHRINKAGES = (1 / 256, 1 / 64, 1 / 16, 1 / 4, 1.0, 4.0)
#: Rank of the low-rank biases. For the state bias, 32 kept 27 % of the KL off held-out int4-g64 text, 8 kept 24 %,
#: 64 kept 28 % for twice the size and per-step cost (BENCHMARKS.md, "Decoding correction").
DEFAULT_RANK = 32


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` over the last dimension; -inf scores count as probability 0."""
    logprobs = log_probs(logits)
    probs = logprobs.exp()
    return -torch.where(probs > 0, probs * logprobs, torch.zeros_like(probs)).sum(-1)


@dataclass
class CorrectionParameters:
    """The tensors of one correction; a field left ``None`` is a family not in use."""

    vocab_size: int
    log_inverse_temperature: torch.Tensor | None = None  # [] ; 0 is the identity
    entropy_slope: torch.Tensor | None = None  # [] ; 0 is the identity
    entropy_center: torch.Tensor | None = None  # [] ; the mean entropy on fit text (a constant, not fitted)
    token_bias: torch.Tensor | None = None  # [vocab]
    previous_token_factors: torch.Tensor | None = None  # [vocab, rank]; zero rows for tokens never seen
    previous_token_basis: torch.Tensor | None = None  # [rank, vocab]
    state_bias_in: torch.Tensor | None = None  # [vocab, rank]; 0 is the identity
    state_bias_out: torch.Tensor | None = None  # [rank, vocab]
    state_bias_offset: torch.Tensor | None = None  # [vocab]; the map's constant part, written through the head
    state_network_read_ids: torch.Tensor | None = None  # [n] int64: the tokens whose scores the state is read from
    state_network_in: torch.Tensor | None = None  # [n, r]: reads the network's input from those scores
    state_network_in_bias: torch.Tensor | None = None  # [r]
    state_network_linear: torch.Tensor | None = None  # [k, r]; zero (with down and bias) is the identity
    state_network_up: torch.Tensor | None = None  # [width, r]
    state_network_up_bias: torch.Tensor | None = None  # [width]
    state_network_down: torch.Tensor | None = None  # [k, width]
    state_network_bias: torch.Tensor | None = None  # [k]
    state_network_out: torch.Tensor | None = None  # [k, vocab]: writes through the output head; k ≤ r

    @classmethod
    def identity(
        cls,
        families: Iterable[str],
        *,
        vocab_size: int,
        rank: int = 8,
        entropy_center: float = 0.0,
        seed: int = 0,
        network_shape: tuple[int, int] = (DEFAULT_NETWORK_RANK, DEFAULT_NETWORK_WIDTH),
        network_write_rank: int | None = None,
    ) -> CorrectionParameters:
        """Parameters at which the correction is exactly the identity, ready to be fitted.

        The previous-token bias starts with a zero first factor and a random second one: the bias is then zero, yet
        the gradient of the first factor is not (two zero factors would be a saddle point the fit never leaves). The
        second factor's entries are of unit size, the scale of a logit: scaled down by √vocab they made the first
        step's change of the loss smaller than fp32 resolves, and the fit never left its start on SmolLM2. The
        state bias is zero here; a fit finds it in closed form (:meth:`HiddenStateFactors.regress`). The state
        network (``network_shape``: rank, width; ``network_write_rank``, by default the rank) is all zeros: a fit
        trains it apart, on states (:func:`~hemorrhage_hf.correction.network.fit_state_network`), and never from
        here.
        """
        families = set(families)
        unknown = families - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown correction families {sorted(unknown)}; choose from {FAMILIES}")
        parameters = cls(vocab_size=vocab_size)
        if families & {"temperature", "entropy_temperature"}:
            parameters.log_inverse_temperature = torch.zeros(())
        if "entropy_temperature" in families:
            parameters.entropy_slope = torch.zeros(())
            parameters.entropy_center = torch.tensor(float(entropy_center))
        if "token_bias" in families:
            parameters.token_bias = torch.zeros(vocab_size)
        generator = torch.Generator().manual_seed(seed)
        if "previous_token" in families:
            parameters.previous_token_factors = torch.zeros(vocab_size, rank)
            parameters.previous_token_basis = torch.randn(rank, vocab_size, generator=generator)
        if "state_bias" in families:
            parameters.state_bias_in = torch.zeros(vocab_size, rank)
            parameters.state_bias_out = torch.zeros(rank, vocab_size)
            parameters.state_bias_offset = torch.zeros(vocab_size)
        if "state_network" in families:
            network_rank, width = network_shape
            write_rank = network_write_rank or network_rank
            read_ids = torch.arange(min(READ_TOKENS, vocab_size))
            n_read = len(read_ids)
            shapes = (
                (n_read,),
                (n_read, network_rank),
                (network_rank,),
                (write_rank, network_rank),
                (width, network_rank),
                (width,),
                (write_rank, width),
                (write_rank,),
                (write_rank, vocab_size),
            )
            for name, shape in zip(NETWORK_TENSORS, shapes, strict=True):
                setattr(parameters, name, torch.zeros(shape))
            parameters.state_network_read_ids = read_ids
        return parameters

    @property
    def families(self) -> tuple[str, ...]:
        present = {
            "temperature": self.log_inverse_temperature is not None and self.entropy_slope is None,
            "entropy_temperature": self.entropy_slope is not None,
            "token_bias": self.token_bias is not None,
            "previous_token": self.previous_token_factors is not None,
            "state_bias": self.state_bias_in is not None,
            "state_network": self.state_network_in is not None,
        }
        return tuple(family for family in FAMILIES if present[family])

    @property
    def rank(self) -> int:
        """Rank of the low-rank biases (they share it); 0 without any."""
        factors = self.previous_token_factors if self.previous_token_factors is not None else self.state_bias_in
        return 0 if factors is None else factors.shape[1]

    @property
    def network_shape(self) -> tuple[int, int]:
        """(rank, width) of the state network; (0, 0) without it."""
        if self.state_network_up is None:
            return 0, 0
        width, rank = self.state_network_up.shape
        return rank, width

    @property
    def network_write_rank(self) -> int:
        """Directions the state network writes along: its rank, or fewer where its fit cut the write
        (:meth:`~hemorrhage_hf.correction.network.StateNetwork.cut_write`); 0 without it."""
        return 0 if self.state_network_out is None else self.state_network_out.shape[0]

    def is_identity(self) -> bool:
        """Every term at its identity value (what a fit on two identical models returns)."""
        terms = (
            self.log_inverse_temperature,
            self.entropy_slope,
            self.token_bias,
            self.previous_token_factors,
            self.state_bias_in,
            self.state_bias_offset,
            self.state_network_linear,
            self.state_network_down,
            self.state_network_bias,
        )
        return all(term is None or not term.any() for term in terms)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors in use, by field name (the safetensors layout)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def trainable(self) -> list[torch.Tensor]:
        """What :func:`fit_correction` optimises by L-BFGS: not the entropy centre (a fixed statistic), nor the state
        bias (fitted before, in closed form, by :meth:`HiddenStateFactors.regress`)."""
        fixed = {"entropy_center", "state_bias_in", "state_bias_out", "state_bias_offset", *NETWORK_TENSORS}
        return [tensor for name, tensor in self.tensors().items() if name not in fixed]

    def penalty(self) -> torch.Tensor:
        """Squared Frobenius norm of the bias tables the L-BFGS fit learns (one entry per vocabulary item, or per
        pair of items): they see little data each, so the fit keeps them small. The previous-token table is
        penalised as the product ‖factors @ basis‖², which, unlike penalising each factor, has zero gradient at the
        identity (zero factors). The state bias has its own shrinkage (:meth:`HiddenStateFactors.regress`)."""
        total = torch.zeros(())
        if self.token_bias is not None:
            total = total + (self.token_bias * self.token_bias).sum()
        if self.previous_token_factors is not None:
            factors, basis = self.previous_token_factors, self.previous_token_basis
            total = total + ((factors.T @ factors) * (basis @ basis.T)).sum()
        return total

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> CorrectionParameters:
        """A copy with ``function`` applied to every tensor (``.to(device)``, ``.detach()``...)."""
        return replace(self, **{name: function(tensor) for name, tensor in self.tensors().items()})

    def validate(self) -> None:
        """Raise ValueError when the tensors do not fit together (a corrupted or hand-edited file)."""
        vocab, rank = self.vocab_size, self.rank
        network_rank, width = self.network_shape
        write_rank = self.network_write_rank
        read = 0 if self.state_network_read_ids is None else len(self.state_network_read_ids)
        expected = {
            "log_inverse_temperature": (),
            "entropy_slope": (),
            "entropy_center": (),
            "token_bias": (vocab,),
            "previous_token_factors": (vocab, rank),
            "previous_token_basis": (rank, vocab),
            "state_bias_in": (vocab, rank),
            "state_bias_out": (rank, vocab),
            "state_bias_offset": (vocab,),
            "state_network_read_ids": (read,),
            "state_network_in": (read, network_rank),
            "state_network_in_bias": (network_rank,),
            "state_network_linear": (write_rank, network_rank),
            "state_network_up": (width, network_rank),
            "state_network_up_bias": (width,),
            "state_network_down": (write_rank, width),
            "state_network_bias": (write_rank,),
            "state_network_out": (write_rank, vocab),
        }
        for name, tensor in self.tensors().items():
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected[name]}")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{name} holds NaN or inf values")
        if (self.entropy_slope is None) != (self.entropy_center is None):
            raise ValueError("entropy_slope and entropy_center come together")
        if self.entropy_slope is not None and self.log_inverse_temperature is None:
            raise ValueError("entropy_slope needs log_inverse_temperature")
        if (self.previous_token_factors is None) != (self.previous_token_basis is None):
            raise ValueError("previous_token_factors and previous_token_basis come together")
        if not (self.state_bias_in is None) == (self.state_bias_out is None) == (self.state_bias_offset is None):
            raise ValueError("state_bias_in, state_bias_out and state_bias_offset come together")
        if len({getattr(self, name) is None for name in NETWORK_TENSORS}) > 1:
            raise ValueError(f"the state network's tensors {', '.join(NETWORK_TENSORS)} come together")
        read_ids = self.state_network_read_ids
        if read_ids is not None and (read_ids.dtype != torch.long or read_ids.min() < 0 or read_ids.max() >= vocab):
            raise ValueError(f"state_network_read_ids must be int64 token ids below {vocab}")


def apply_correction(
    scores: torch.Tensor,
    previous_ids: torch.Tensor,
    parameters: CorrectionParameters,
    *,
    scores_entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """Corrected fp32 scores ``[..., vocab]``; ``previous_ids[...]`` is the token each position has just read.

    Works for one generation step (``[batch, vocab]`` with ``input_ids[:, -1]``) and for whole sequences
    (``[batch, time, vocab]`` with ``input_ids``) alike, so measured figures use exactly the math of generation.
    ``scores_entropy`` (``[...]``) spares recomputing :func:`entropy` of ``scores`` where it is already known.

    The state network comes first: it corrects the state behind the scores, and every other family reads the
    corrected scores (they are fitted on them).
    """
    scores = scores.float()
    if parameters.state_network_in is not None:
        scores = scores + state_network_term(scores, parameters)
        scores_entropy = None
    corrected = scores
    if parameters.log_inverse_temperature is not None:
        if parameters.entropy_slope is not None and scores_entropy is None:
            scores_entropy = entropy(scores)
        corrected = corrected * _log_scale(parameters, scores_entropy).exp().unsqueeze(-1)
    if parameters.token_bias is not None:
        corrected = corrected + parameters.token_bias
    if parameters.previous_token_factors is not None:
        corrected = corrected + parameters.previous_token_factors[previous_ids] @ parameters.previous_token_basis
    if parameters.state_bias_in is not None:
        state_bias = (_state_features(scores) @ parameters.state_bias_in) @ parameters.state_bias_out
        corrected = corrected + state_bias + parameters.state_bias_offset
    return corrected


def state_network_term(scores: torch.Tensor, parameters: CorrectionParameters) -> torch.Tensor:
    """What the state network adds to ``scores`` (``[..., vocab]``): read, map, write (correction_network).

    A row where an earlier processor banned one of the read tokens (a score of -inf) gets no network correction:
    its state can no longer be read exactly."""
    read_scores = scores[..., parameters.state_network_read_ids]
    readable = torch.isfinite(read_scores).all(-1, keepdim=True)
    if not readable.all():
        read_scores = torch.where(readable, read_scores, torch.zeros_like(read_scores))
    read = read_scores @ parameters.state_network_in + parameters.state_network_in_bias
    hidden = torch.nn.functional.gelu(read @ parameters.state_network_up.T + parameters.state_network_up_bias)
    change = read @ parameters.state_network_linear.T + hidden @ parameters.state_network_down.T
    term = (change + parameters.state_network_bias) @ parameters.state_network_out
    return term if readable.all() else term * readable


def _log_scale(parameters: CorrectionParameters, scores_entropy: torch.Tensor | None) -> torch.Tensor:
    """Log of the inverse temperature: ``[]``, or ``[...]`` per position with the entropy-dependent family."""
    log_scale = parameters.log_inverse_temperature
    if parameters.entropy_slope is not None:
        log_scale = log_scale + parameters.entropy_slope * (scores_entropy - parameters.entropy_center)
    return log_scale


def _state_features(scores: torch.Tensor) -> torch.Tensor:
    """Scores centred over the vocabulary (a constant shift of all scores changes nothing). A -inf score (a token an
    earlier processor banned) reads as the row's lowest finite score, so it cannot turn the bias into NaN."""
    if not torch.isfinite(scores).all():
        finite = torch.isfinite(scores)
        floor = torch.where(finite, scores, torch.inf).amin(-1, keepdim=True)
        scores = torch.where(finite, scores, floor)
    return scores - scores.mean(-1, keepdim=True)


@dataclass
class HiddenStateFactors:
    """The ``state_bias`` family as it is fitted: a rank-``r`` affine map of the modified model's final hidden state
    ``h``, ``Δh = h @ first @ second.T + offset``, written back into the scores through the output embeddings ``E``
    (scores = ``h @ E.T``). ``h`` itself is read from the centred scores with ``reader``, the pseudo-inverse of the
    centred ``E.T``, exactly so for an output head without bias.

    :meth:`regress` finds the map in closed form: the hidden state the reference's scores ask for (read through the
    same head) regressed on the modified one, shrunk towards zero, then cut to the ``r`` directions that carry most
    of its fit. On SmolLM2 int4-g64 this keeps more on held-out text than minimising the KL over the same factors
    did (27 % against 22 % of the KL removed, rank 32 against 8, which overfitted at 32) in seconds instead of
    minutes (BENCHMARKS.md, "Decoding correction").
    """

    reader: torch.Tensor  # [vocab, hidden]
    output_embeddings: torch.Tensor  # [vocab, hidden]
    first: torch.Tensor  # [hidden, rank]; zero at the identity
    second: torch.Tensor  # [hidden, rank]
    offset: torch.Tensor  # [hidden]

    @classmethod
    def on_head(
        cls,
        output_embeddings: torch.Tensor,
        first: torch.Tensor | None = None,
        second: torch.Tensor | None = None,
        offset: torch.Tensor | None = None,
    ) -> HiddenStateFactors:
        """The map ``first``, ``second``, ``offset`` of the hidden state behind the head ``output_embeddings``
        (left out: no map yet, only the head to :meth:`read` states with and :meth:`regress` a map on)."""
        output_embeddings = output_embeddings.detach().float()
        centred = output_embeddings - output_embeddings.mean(0)
        no_map = torch.empty(0, device=output_embeddings.device)
        return cls(
            torch.linalg.pinv(centred.T),
            output_embeddings,
            *(no_map if tensor is None else tensor for tensor in (first, second, offset)),
        )

    def regress(
        self,
        data: PairedLogits,
        modified: torch.Tensor,
        *,
        rank: int,
        select: PairedLogits | None = None,
        shrinkages: tuple[float, ...] = SHRINKAGES,
        chunk_size: int = 1024,
    ) -> HiddenStateFactors:
        """The rank-``rank`` affine map of the hidden state on this head, fitted to ``data``, whose modified
        states ``modified`` (``[N, hidden]``, :meth:`read_rows` of its modified logits) the caller has read already.

        The shrinkage (> 0), a multiple of the mean variance of the hidden state, is the one among ``shrinkages``
        whose map, fitted on ``data``, leaves the least KL on ``select`` (other documents); without ``select``, on
        the last fifth of ``data`` after fitting on the rest. The map is then fitted on all of ``data``. Two
        identical models give a zero map, exactly.
        """
        hidden_size = self.output_embeddings.shape[1]
        if not 0 < rank <= hidden_size:
            raise ValueError(f"the state_bias rank must be in 1..{hidden_size} (the hidden size), got {rank}")
        wanted = self.read_rows(data.reference_logits, chunk_size)
        if select is None:
            split = len(data) - len(data) // 5
            fit_rows, check, check_states = slice(0, split), data.rows(slice(split, None)), modified[split:]
        else:
            fit_rows, check, check_states = slice(None), select, self.read_rows(select.modified_logits, chunk_size)

        def solve(rows: slice, shrinkage: float) -> HiddenStateFactors:
            first, second, offset = _reduced_rank_ridge(modified[rows], wanted[rows], rank, shrinkage)
            return replace(self, first=first, second=second, offset=offset)

        def check_loss(shrinkage: float) -> float:
            state = solve(fit_rows, shrinkage)
            total = 0.0
            for start, chunk in zip(range(0, len(check), chunk_size), check.chunks(chunk_size)):
                states = check_states[start : start + chunk_size]
                shift = (states @ state.first @ state.second.T + state.offset) @ state.output_embeddings.T
                total += kl_divergence(chunk.reference_logprobs, log_probs(chunk.modified_logits + shift)).sum().item()
            return total

        best = min(shrinkages, key=check_loss) if len(shrinkages) > 1 else shrinkages[0]
        return solve(slice(None), best)

    def read(self, scores: torch.Tensor) -> torch.Tensor:
        """The final hidden states ``[..., hidden]`` behind ``scores`` (up to the head's bias, if it has one)."""
        return _state_features(scores) @ self.reader

    def read_rows(self, scores: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """:meth:`read` of ``[N, vocab]`` fp16 scores, ``chunk_size`` rows at a time in fp32."""
        return torch.cat(
            [self.read(scores[start : start + chunk_size].float()) for start in range(0, len(scores), chunk_size)]
        )

    def written(self) -> torch.Tensor:
        """``[rank, vocab]``: the map's output directions, written into the scores through the output head."""
        return self.second.T @ self.output_embeddings.T

    def into(self, parameters: CorrectionParameters) -> CorrectionParameters:
        """``parameters`` with the state bias these factors stand for, in the vocabulary-space form it is stored in."""
        return replace(
            parameters,
            state_bias_in=self.reader @ self.first,
            state_bias_out=self.written(),
            state_bias_offset=self.output_embeddings @ self.offset,
        )


def _reduced_rank_ridge(
    modified: torch.Tensor, wanted: torch.Tensor, rank: int, shrinkage: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``first``, ``second`` (``[hidden, rank]``) and ``offset`` (``[hidden]``) such that
    ``modified + modified @ first @ second.T + offset`` approaches ``wanted`` (both ``[N, hidden]``) in least squares.

    A ridge regression of the change, its penalty ``shrinkage`` × the mean diagonal of the Gram matrix (so one
    setting suits any amount of text and any scale of state), then projected onto the ``rank`` output directions
    of largest fitted variance: the best rank-``rank`` map among those the ridge allows (reduced-rank regression).
    """
    inputs, change = modified.double(), (wanted - modified).double()
    input_mean, change_mean = inputs.mean(0), change.mean(0)
    inputs, change = inputs - input_mean, change - change_mean
    gram = inputs.T @ inputs
    mean_variance = gram.diagonal().mean()
    if mean_variance > 0:
        identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        full_map = torch.linalg.solve(gram + shrinkage * mean_variance * identity, inputs.T @ change)
    else:  # every state the same: nothing to regress on, the offset holds all there is
        full_map = torch.zeros_like(gram)
    _, directions = torch.linalg.eigh(full_map.T @ gram @ full_map)  # covariance of the fitted change, ascending
    second = directions[:, -rank:].flip(-1)
    first = full_map @ second
    offset = change_mean - input_mean @ first @ second.T
    device = modified.device
    return first.float().to(device), second.float().to(device), offset.float().to(device)


class Chunk(NamedTuple):
    """Some positions of :class:`PairedLogits`, in fp32, as a fit and its check read them."""

    reference_logprobs: torch.Tensor
    modified_logits: torch.Tensor
    modified_entropy: torch.Tensor
    previous_ids: torch.Tensor


@dataclass
class PairedLogits:
    """Aligned next-token logits of the two models at N positions. They are kept in fp16 (4 bytes × vocabulary per
    position) because a fit revisits them many times; both models' logits are rounded alike, so two identical
    models still give identical data. The modified model's entropies never change during a fit: they are kept."""

    reference_logits: torch.Tensor  # [N, vocab] fp16
    modified_logits: torch.Tensor  # [N, vocab] fp16
    modified_entropy: torch.Tensor  # [N] fp32, of the fp32 logits
    previous_ids: torch.Tensor  # [N]

    def __len__(self) -> int:
        return len(self.previous_ids)

    @classmethod
    def from_logits(
        cls, reference_logits: torch.Tensor, modified_logits: torch.Tensor, previous_ids: torch.Tensor
    ) -> PairedLogits:
        return cls(_to_half(reference_logits), _to_half(modified_logits), entropy(modified_logits), previous_ids)

    @classmethod
    def concatenate(cls, parts: list[PairedLogits]) -> PairedLogits:
        return cls(*(torch.cat([getattr(part, f.name) for part in parts]) for f in fields(cls)))

    def rows(self, rows: slice) -> PairedLogits:
        """The positions ``rows``."""
        return PairedLogits(*(getattr(self, f.name)[rows] for f in fields(self)))

    def with_modified_logits(
        self, transform: Callable[[torch.Tensor], torch.Tensor], chunk_size: int = 1024
    ) -> PairedLogits:
        """The same positions with the modified logits replaced by ``transform`` of them (fp32 in, kept in fp16),
        e.g. corrected by a family fitted before the others."""
        modified, modified_entropy = [], []
        for start in range(0, len(self), chunk_size):
            logits = transform(self.modified_logits[start : start + chunk_size].float())
            modified.append(_to_half(logits))
            modified_entropy.append(entropy(logits))
        return replace(self, modified_logits=torch.cat(modified), modified_entropy=torch.cat(modified_entropy))

    def chunks(self, size: int) -> Iterator[Chunk]:
        for start in range(0, len(self), size):
            stop = start + size
            yield Chunk(
                log_probs(self.reference_logits[start:stop]),
                self.modified_logits[start:stop].float(),
                self.modified_entropy[start:stop],
                self.previous_ids[start:stop],
            )


def _to_half(logits: torch.Tensor) -> torch.Tensor:
    half_range = torch.finfo(torch.float16).max
    return logits.float().clamp(-half_range, half_range).half()


def _correction_terms(
    parameters: CorrectionParameters,
    state: HiddenStateFactors | None,
    data: PairedLogits,
    hidden: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``apply_correction`` of all of ``data`` as ``scores · scale + bias + factors @ basis``: per-position scale
    ``[N]``, bias ``[vocab]``, and the low-rank terms side by side (``[N, k]`` @ ``[k, vocab]``, ``k`` may be 0).
    None is as large as the scores: the fit builds them once per step, for every chunk."""
    count, vocab_size = data.modified_logits.shape
    device = data.modified_logits.device
    scale = torch.ones(count, device=device)
    if parameters.log_inverse_temperature is not None:
        scale = scale * _log_scale(parameters, data.modified_entropy).exp()
    bias = parameters.token_bias if parameters.token_bias is not None else torch.zeros(vocab_size, device=device)
    factors, bases = [torch.zeros(count, 0, device=device)], [torch.zeros(0, vocab_size, device=device)]
    if parameters.previous_token_factors is not None:
        factors.append(parameters.previous_token_factors[data.previous_ids])
        bases.append(parameters.previous_token_basis)
    if state is not None:
        factors.append(hidden @ state.first)
        bases.append(state.written())
        bias = bias + state.output_embeddings @ state.offset
    return scale, bias, torch.cat(factors, -1), torch.cat(bases)


class _CorrectedScoresLoss(torch.autograd.Function):
    """``Σ_positions logsumexp(z') − P_ref · z'`` (the KL up to a constant) of ``z' = z · scale + bias + factors @
    basis`` over all of ``data``, chunk by chunk, with its gradient written out (``softmax(z') − P_ref`` against each
    term) and gathered as each chunk passes. Autograd would keep several ``[positions × vocab]`` intermediates of
    every chunk until its backward; this keeps none, and the fit runs 1.6–1.9 times as fast (BENCHMARKS.md)."""

    @staticmethod
    def forward(ctx, data: PairedLogits, chunk_size: int, scale, bias, factors, basis):
        loss = scale.new_zeros(())
        scale_gradient, factors_gradient = torch.empty_like(scale), torch.empty_like(factors)
        bias_gradient, basis_gradient = torch.zeros_like(bias), torch.zeros_like(basis)
        for start, chunk in zip(range(0, len(data), chunk_size), data.chunks(chunk_size)):
            rows = slice(start, start + chunk_size)
            reference_probs = chunk.reference_logprobs.exp()
            corrected = torch.addmm(bias, factors[rows], basis).addcmul_(chunk.modified_logits, scale[rows, None])
            normaliser = torch.logsumexp(corrected, -1)
            loss += (normaliser - (reference_probs * corrected).sum(-1)).sum()
            gradient = corrected.sub_(normaliser.unsqueeze(-1)).exp_().sub_(reference_probs)
            scale_gradient[rows] = (gradient * chunk.modified_logits).sum(-1)
            factors_gradient[rows] = gradient @ basis.T
            bias_gradient += gradient.sum(0)
            basis_gradient.addmm_(factors[rows].T, gradient)
        ctx.save_for_backward(scale_gradient, bias_gradient, factors_gradient, basis_gradient)
        return loss

    @staticmethod
    def backward(ctx, loss_gradient):
        return None, None, *(gradient * loss_gradient for gradient in ctx.saved_tensors)


def fit_correction(
    data: PairedLogits,
    families: Iterable[str],
    *,
    output_embeddings: torch.Tensor | None = None,
    rank: int = DEFAULT_RANK,
    regularization: float = 1e-4,
    max_iterations: int = 40,
    select: PairedLogits | None = None,
    chunk_size: int = 1024,
    seed: int = 0,
) -> CorrectionParameters:
    """Fit ``families`` to ``data``: the ``state_bias`` first, in closed form (:meth:`HiddenStateFactors.regress`),
    then the other families around it, minimising the mean KL(P_ref ‖ softmax(corrected)) plus ``regularization`` ×
    :meth:`CorrectionParameters.penalty` with full-batch L-BFGS.

    ``output_embeddings`` (``[vocab, hidden]``, the modified model's output head) is needed by the ``state_bias``
    family only; ``select`` (positions of other documents), where given, chooses its shrinkage. Two identical models
    give a zero state map and zero gradients: the fit returns the identity exactly.
    """
    families = tuple(families)
    vocab_size = data.modified_logits.shape[-1]
    parameters = CorrectionParameters.identity(
        families,
        vocab_size=vocab_size,
        rank=rank,
        entropy_center=data.modified_entropy.double().mean().item(),
        seed=seed,
    )
    state = hidden = None
    if "state_bias" in families:
        if output_embeddings is None or tuple(output_embeddings.shape[:1]) != (vocab_size,):
            raise ValueError(
                "the state_bias family needs output_embeddings, the modified model's [vocab, hidden] output head "
                f"for a vocabulary of {vocab_size}"
            )
        # The modified model's states never change during the fit: read once, for the regression and the L-BFGS.
        head = HiddenStateFactors.on_head(output_embeddings.to(data.modified_logits.device))
        hidden = head.read_rows(data.modified_logits, chunk_size)
        state = head.regress(data, hidden, rank=rank, select=select, chunk_size=chunk_size)

    trainable = parameters.trainable()
    if trainable:
        _minimise_kl(
            data,
            parameters,
            state,
            hidden,
            trainable,
            regularization=regularization,
            max_iterations=max_iterations,
            chunk_size=chunk_size,
        )
    fitted = parameters if state is None else state.into(parameters)
    return fitted.map(lambda tensor: tensor.detach())


def _minimise_kl(
    data: PairedLogits,
    parameters: CorrectionParameters,
    state: HiddenStateFactors | None,
    hidden: torch.Tensor | None,
    trainable: list[torch.Tensor],
    *,
    regularization: float,
    max_iterations: int,
    chunk_size: int,
) -> None:
    """Full-batch L-BFGS on ``trainable`` (tensors of ``parameters``, changed in place), the state bias held fixed."""
    for tensor in trainable:
        tensor.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        trainable,
        max_iter=max_iterations,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-7,
        tolerance_change=1e-12,
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = _CorrectedScoresLoss.apply(data, chunk_size, *_correction_terms(parameters, state, data, hidden))
        loss = loss / len(data)
        loss.backward()
        total = loss.item()
        penalty = regularization * parameters.penalty()
        if penalty.requires_grad:
            penalty.backward()
            total += penalty.item()
        return torch.tensor(total)

    # Callers may sit under no_grad (pipelines do); the fit needs gradients whatever the context.
    with torch.enable_grad():
        optimizer.step(closure)


@torch.no_grad()
def kl_before_after(
    data: PairedLogits, parameters: CorrectionParameters, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(P_ref ‖ P_mod) without and with the correction."""
    before, after = [], []
    for chunk in data.chunks(chunk_size):
        corrected = apply_correction(
            chunk.modified_logits, chunk.previous_ids, parameters, scores_entropy=chunk.modified_entropy
        )
        before.append(kl_divergence(chunk.reference_logprobs, log_probs(chunk.modified_logits)))
        after.append(kl_divergence(chunk.reference_logprobs, log_probs(corrected)))
    return torch.cat(before), torch.cat(after)
