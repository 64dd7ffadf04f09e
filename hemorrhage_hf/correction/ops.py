"""Pure tensor functions of the decoding correction's fit: the state bias in closed form (reduced-rank ridge in the
hidden space), both models' paired logits as the fit keeps them, the KL and its gradient over the families fitted by
L-BFGS, and the KL with and without a correction.

The families and how they apply are :mod:`.corrections`. ``state_bias`` reads the modified model's own logits:
since they are a linear image of its final hidden state, it is a rank-``r`` affine correction of that state. It is
fitted first, in closed form in the hidden space (:class:`HiddenStateFactors`, (2 ``r`` + 1) × hidden numbers), and
stored as vocabulary-space factors, so the processor needs no model; the other families are then fitted around it
by L-BFGS on the KL. ``state_network`` (:mod:`.network`) is trained apart, on states of much more text, before
everything else; the other families are fitted on the scores it corrected.

Example:
    >>> import torch
    >>> from hemorrhage_hf.correction.ops import _reduced_rank_ridge
    >>> modified = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    >>> first, second, offset = _reduced_rank_ridge(modified, modified + 1.0, rank=1, shrinkage=1e-6)
    >>> [round(value, 3) for value in offset.tolist()]  # the change is a constant shift: all in the offset
    [1.0, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch

from ..measurement.divergence import kl_divergence, log_probs
from .corrections import CorrectionParameters, LinearTerms, StateBias, entropy, state_features

#: Ridge penalties the state bias chooses from, as multiples of the hidden state's mean variance: a model that differs
#: from its reference by an exact linear map of the state wants almost none, a quantized or pruned one much more.
SHRINKAGES = (1 / 256, 1 / 64, 1 / 16, 1 / 4, 1.0, 4.0)
#: Rank of the low-rank biases. For the state bias a higher rank keeps a little more on new text, for a larger file
#: and per-step product; 32 is where the gain flattens (docs/correction-history.md).
DEFAULT_RANK = 32


@dataclass
class HiddenStateFactors:
    """The ``state_bias`` family as it is fitted: a rank-``r`` affine map of the modified model's final hidden state
    ``h``, ``Δh = h @ first @ second.T + offset``, written back into the scores through the output embeddings ``E``
    (scores = ``h @ E.T``). ``h`` itself is read from the centred scores with ``reader``, the pseudo-inverse of the
    centred ``E.T``, exactly so for an output head without bias.

    :meth:`regress` finds the map in closed form: the hidden state the reference's scores ask for (read through the
    same head) regressed on the modified one, shrunk towards zero, then cut to the ``r`` directions that carry most
    of its fit. This kept more on held-out text than minimising the KL over the same factors did, at every rank
    (where the KL fit overfitted as the rank grew), in seconds instead of minutes (docs/correction-history.md).
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
        return state_features(scores) @ self.reader

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
        state_bias = StateBias(self.reader @ self.first, self.written(), self.output_embeddings @ self.offset)
        return parameters.with_families([state_bias])


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
    """The correction of all of ``data`` as ``scores · scale + bias + factors @ basis``: per-position scale ``[N]``,
    bias ``[vocab]``, and the low-rank terms side by side (``[N, k]`` @ ``[k, vocab]``, ``k`` may be 0), gathered
    from each family's :meth:`~hemorrhage_hf.correction.corrections.Family.linear_terms` and the fixed state bias.
    None is as large as the scores: the fit builds them once per step, for every chunk."""
    count, vocab_size = data.modified_logits.shape
    device = data.modified_logits.device
    log_scale, bias = torch.zeros(count, device=device), torch.zeros(vocab_size, device=device)
    factors, bases = [torch.zeros(count, 0, device=device)], [torch.zeros(0, vocab_size, device=device)]
    terms = [family.linear_terms(data.previous_ids, data.modified_entropy) for family in parameters]
    if state is not None:
        terms.append(LinearTerms(None, state.output_embeddings @ state.offset, hidden @ state.first, state.written()))
    for term in terms:
        log_scale = log_scale if term.log_scale is None else log_scale + term.log_scale
        bias = bias if term.bias is None else bias + term.bias
        factors += [] if term.factors is None else [term.factors]
        bases += [] if term.basis is None else [term.basis]
    return log_scale.exp(), bias, torch.cat(factors, -1), torch.cat(bases)


class _CorrectedScoresLoss(torch.autograd.Function):
    """``Σ_positions logsumexp(z') − P_ref · z'`` (the KL up to a constant) of ``z' = z · scale + bias + factors @
    basis`` over all of ``data``, chunk by chunk, with its gradient written out (``softmax(z') − P_ref`` against each
    term) and gathered as each chunk passes. Autograd would keep several ``[positions × vocab]`` intermediates of
    every chunk until its backward; this keeps none, and the fit runs faster for it."""

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
        [family for family in families if family != "state_bias"],  # fitted apart, below
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
        corrected = parameters.apply(chunk.modified_logits, chunk.previous_ids, scores_entropy=chunk.modified_entropy)
        before.append(kl_divergence(chunk.reference_logprobs, log_probs(chunk.modified_logits)))
        after.append(kl_divergence(chunk.reference_logprobs, log_probs(corrected)))
    return torch.cat(before), torch.cat(after)
