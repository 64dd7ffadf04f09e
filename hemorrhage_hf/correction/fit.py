"""Fitting a decoding correction, one step per function: plan the text, collect both models' predictions, fit the
families, judge the result.

Held out means held out: the text is split *by document* into three shares. The families are fitted on ``fit``;
every choice the fit makes (the state bias's shrinkage, whether the state network stays, whether the families fitted
around it stay) is made on ``select``; the figures the fit reports come from ``report``, documents it never used to
fit or to choose. Windows of one article share its topic, names and words: held out between fit windows of the same
articles, they would flatter the correction.

What those figures promise holds for text like the fit text. A correction learns how the modified model errs on
that kind of text; on another kind it can remove much less of the KL and even raise the perplexity ratio. A fit
whose correction raises the PPL ratio on its report share says so (:attr:`FitSummary.raises_ppl_ratio`, and a
:class:`CorrectionWarning`) and is never called helpful.

Example:
    >>> from hemorrhage_hf.correction.fit import share_of_documents
    >>> share_of_documents([100] * 10, seed=0)  # 0: fit, 1: select, 2: report; by tokens, 3 : 1 : 1
    [1, 1, 0, 0, 0, 2, 2, 0, 0, 0]
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..corpus import Window, make_windows, tokenize_documents
from ..errors import CorpusError, CorrectionError, TokenizerMismatchError
from ..measurement.engine import batch_windows, measure
from ..measurement.memory import return_free_pages
from ..measurement.statistics import block_standard_error
from .corrections import CorrectionParameters, StateNetworkCorrection
from .network import (
    DEFAULT_EPOCHS,
    DEFAULT_NETWORK_RANK,
    DEFAULT_NETWORK_WIDTH,
    OutputHead,
    StateData,
    fit_state_network,
    read_tokens,
    vocabulary_tensors,
)
from .ops import DEFAULT_RANK, PairedLogits, fit_correction, kl_before_after
from .processor import CorrectionWarning, DecodingCorrection, FitSummary
from .reference_samples import sample_windows

DEFAULT_FAMILIES = ("entropy_temperature", "token_bias", "state_bias")
#: Tokens a fit reads by default, over its three shares: more text of more kinds carries better to new text.
DEFAULT_MAX_TOKENS = 16384
#: Tokens a fit with the ``state_network`` reads by default: the network learns the fit text itself unless it sees
#: a great deal of it.
NETWORK_MAX_TOKENS = 262144
#: With the ``state_network``, the other families still fit on logits (4 bytes × vocabulary per prediction): they
#: keep them for this many tokens of the fit share, spread over it; the rest is kept as states only.
LOGIT_MAX_TOKENS = DEFAULT_MAX_TOKENS
#: Shares of the documents' tokens: fit, select, report.
SHARE_WEIGHTS = (3, 1, 1)
#: The select and report shares read at most this many tokens each where a fit reads more (the state network's
#: text): a few thousand tokens tell a correction's effect from noise; the rest is better spent fitting.
HELD_OUT_MAX_TOKENS = DEFAULT_MAX_TOKENS // 5
#: A text without article titles is cut into contiguous parts of (at most) this many windows, the documents of the
#: split: neighbouring windows still share a topic, parts far apart much less.
PART_WINDOWS = 4
#: Fewer scored tokens than these cannot fit a per-token correction, or tell its effect from noise.
MIN_FIT_TOKENS = 256
MIN_HELD_OUT_TOKENS = 64

FitText = str | Sequence[str] | torch.Tensor | Sequence[Window]

#: WikiText's article titles, `` = Title = `` on a line of their own (section titles are `` = = Section = = ``).
_ARTICLE_TITLE = re.compile(r"^ = [^=].* = *$", re.MULTILINE)


@dataclass(frozen=True)
class NetworkOptions:
    """How the ``state_network`` family is trained (``correct --network-*``; :mod:`.network`).

    ``write_rank`` cuts the trained network's write to that many directions (at most ``rank``): the processor's
    cost per generation step scales with it. ``sampled_tokens`` adds that many tokens of the reference's own
    samples, after prompts cut from the fit share, to the network's fit (:mod:`.reference_samples`).
    """

    rank: int = DEFAULT_NETWORK_RANK
    width: int = DEFAULT_NETWORK_WIDTH
    epochs: int = DEFAULT_EPOCHS
    write_rank: int | None = None
    sampled_tokens: int = 0


@dataclass(frozen=True)
class LogitFitOptions:
    """How the families fitted on logits are fitted (:func:`~hemorrhage_hf.correction.ops.fit_correction`)."""

    rank: int = DEFAULT_RANK
    regularization: float = 1e-4
    max_iterations: int = 40


@dataclass
class Shares:
    """The windows of each share, and how many documents each drew from."""

    fit: list[Window]
    select: list[Window]
    report: list[Window]
    documents: tuple[int, int, int]

    @property
    def tokens(self) -> tuple[int, int, int]:
        return tuple(sum(window.n_scored for window in share) for share in (self.fit, self.select, self.report))


@dataclass
class Collected:
    """What the fit keeps of both models' predictions on one share: logits, states, or both."""

    logits: PairedLogits | None = None
    states: StateData | None = None


# ----------------------------------------------------------------------------------------------------- plan


def split_documents(text: str) -> list[str]:
    """The articles of a WikiText-style text, each from its `` = Title = `` line; ``[text]`` if it has fewer than
    two."""
    starts = [match.start() for match in _ARTICLE_TITLE.finditer(text)]
    if len(starts) < 2:
        return [text]
    bounds = [0, *starts[1:], len(text)]
    return [text[begin:end] for begin, end in zip(bounds, bounds[1:]) if text[begin:end].strip()]


def as_documents(
    text: FitText, tokenizer: PreTrainedTokenizerBase | None, *, window: int, stride: int | None
) -> list[list[Window]]:
    """The fit text as documents of windows: a text's articles (:func:`split_documents`), each text of a list, each
    row of a ``[n, length]`` token tensor; a text without articles, or windows, in contiguous parts."""
    if isinstance(text, torch.Tensor):
        if text.dim() != 2 or text.dtype != torch.long:
            raise CorpusError(f"fit token ids must be a [n, length] LongTensor, got {text.dtype} {tuple(text.shape)}")
        documents = [make_windows(row, window=row.shape[0]) for row in text]
    elif isinstance(text, str) or (text and isinstance(text[0], str)):
        if tokenizer is None:
            raise CorrectionError("fit text needs the tokenizer (tokenizer=...)")
        texts = split_documents(text) if isinstance(text, str) else list(text)
        documents = tokenize_documents(tokenizer, texts, window=window, stride=stride)
    else:
        documents = [list(text)]
    if len(documents) >= len(SHARE_WEIGHTS):
        return documents
    windows = [window for document in documents for window in document]
    size = max(1, min(PART_WINDOWS, len(windows) // sum(SHARE_WEIGHTS)))
    return [windows[start : start + size] for start in range(0, len(windows), size)]


def share_of_documents(token_counts: Sequence[int], seed: int) -> list[int]:
    """The share (0 fit, 1 select, 2 report) of each document, given its tokens: documents in a seeded random order,
    each to the share furthest below its part of :data:`SHARE_WEIGHTS`, so shares match it in tokens."""
    order = torch.randperm(len(token_counts), generator=torch.Generator().manual_seed(seed)).tolist()
    targets = [weight / sum(SHARE_WEIGHTS) for weight in SHARE_WEIGHTS]
    filled, shares = [0] * len(targets), [0] * len(token_counts)
    for index in order:
        total = sum(filled) + token_counts[index]
        share = max(range(len(targets)), key=lambda s: targets[s] * total - filled[s])
        shares[index] = share
        filled[share] += token_counts[index]
    return shares


def plan_shares(documents: list[list[Window]], max_tokens: int, seed: int) -> Shares:
    """Documents into shares (:func:`share_of_documents`), each share's windows spread to its budget of
    ``max_tokens``: select and report get a fifth each, at most :data:`HELD_OUT_MAX_TOKENS`; fit the rest."""
    counts = [sum(window.n_scored for window in document) for document in documents]
    assigned = share_of_documents(counts, seed)
    held_out_budget = min(max_tokens * SHARE_WEIGHTS[1] // sum(SHARE_WEIGHTS), HELD_OUT_MAX_TOKENS)
    budgets = (max_tokens - 2 * held_out_budget, held_out_budget, held_out_budget)
    windows = [
        spread([w for document, s in zip(documents, assigned) if s == share for w in document], budget, seed)
        for share, budget in enumerate(budgets)
    ]
    shares = Shares(*windows, documents=tuple(assigned.count(share) for share in range(3)))
    _check_shares(shares, len(documents))
    return shares


def _check_shares(shares: Shares, documents: int) -> None:
    fit, select, report = shares.tokens
    if fit < MIN_FIT_TOKENS or min(select, report) < MIN_HELD_OUT_TOKENS:
        raise CorpusError(
            f"fit text too short: {documents} document(s) give {fit} tokens to fit on, {select} to choose on and "
            f"{report} to report on; at least {MIN_FIT_TOKENS}, {MIN_HELD_OUT_TOKENS} and {MIN_HELD_OUT_TOKENS} are "
            "needed (documents are split 3 : 1 : 1). Pass a longer text or a smaller window."
        )


def spread(windows: list[Window], max_tokens: int | None, seed: int) -> list[Window]:
    """At most about ``max_tokens`` scored tokens in windows drawn at seeded random places, kept in text order:
    windows from all over a text make a fit that carries further than consecutive ones, which share a topic."""
    if max_tokens is None or sum(w.n_scored for w in windows) <= max_tokens:
        return windows
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen, total = [], 0
    for index in order:
        if total >= max_tokens:
            break
        chosen.append(index)
        total += windows[index].n_scored
    return [windows[index] for index in sorted(chosen)]


def divide(windows: list[Window], budget: int, seed: int) -> tuple[list[Window], list[Window]]:
    """About ``budget`` tokens of ``windows`` drawn from all over them (:func:`spread`), and the rest."""
    chosen = spread(windows, budget, seed)
    taken = {id(window) for window in chosen}
    return chosen, [window for window in windows if id(window) not in taken]


# ----------------------------------------------------------------------------------------------------- collect


@contextlib.contextmanager
def _head_inputs(model: PreTrainedModel) -> Iterator[list[torch.Tensor]]:
    """The final hidden states the output head reads during the ``with`` block, one tensor per forward pass."""
    captured: list[torch.Tensor] = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0])
    )
    try:
        yield captured
    finally:
        handle.remove()


def _check_plain_head(states: torch.Tensor, logits: torch.Tensor, head: OutputHead) -> None:
    """The state network corrects scores as ``states @ Eᵀ + b``: a model that changes its scores after the head
    (soft-capping, scaling) is refused rather than corrected wrongly. The tolerance allows for the scores' own
    rounding: a bfloat16 model's are rounded to 8 bits."""
    expected = torch.addmm(head.bias, states[:8].float(), head.weight.T)
    tolerance = max(1e-3, 2 * torch.finfo(logits.dtype).eps)
    if not torch.allclose(expected, logits[:8].float(), rtol=tolerance, atol=tolerance * logits[:8].abs().max().item()):
        raise CorrectionError(
            "the state_network family needs scores that are the output head applied to the final hidden state; "
            "this model changes them after its head (logit soft-capping or scaling?). Leave state_network out."
        )


def _logits(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids.to(model.device), use_cache=False).logits


@torch.no_grad()
def collect(
    reference: PreTrainedModel,
    modified: PreTrainedModel,
    windows: list[Window],
    batch_size: int,
    bar,
    *,
    head: OutputHead | None,
    keep_logits: bool = True,
) -> Collected:
    """Both models' predictions on ``windows``: their fp16 logits (``keep_logits``) and, given the modified model's
    ``head``, the states the state network fits on (written into one allocation: parts kept window by window
    fragmented the heap until it grew by tens of MiB a window)."""
    logit_parts, written = [], 0
    states = None
    if head is not None and windows:
        states = StateData.empty(sum(w.n_scored for w in windows), head.weight.shape[1], head.weight.device)
    for batch in batch_windows(windows, batch_size):
        reference_logits = batch.scored(_logits(reference, batch.input_ids))
        with _head_inputs(modified) as hidden:
            modified_logits = batch.scored(_logits(modified, batch.input_ids))
        if keep_logits:
            previous_ids = batch.scored(batch.input_ids)
            logit_parts.append(PairedLogits.from_logits(reference_logits, modified_logits, previous_ids))
        if head is not None:
            device = head.weight.device
            scored_states = batch.scored(hidden[-1]).to(device)
            if not written:
                _check_plain_head(scored_states, modified_logits.to(device), head)
            part = StateData.from_predictions(
                reference_logits.to(device), modified_logits.to(device), scored_states, head
            )
            states.write(written, part)
            written += len(part)
        del reference_logits, modified_logits, hidden
        return_free_pages()  # as the measurement does: resident memory follows what is alive, not what once was
        bar.update(len(batch.first_scored))
    return Collected(PairedLogits.concatenate(logit_parts) if logit_parts else None, states)


# ----------------------------------------------------------------------------------------------------- fit families


def _vocab_size(model: PreTrainedModel) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _token_counts(windows: list[Window], vocab_size: int) -> torch.Tensor:
    return torch.bincount(torch.cat([window.input_ids for window in windows]), minlength=vocab_size)[:vocab_size]


def _special_ids(model: PreTrainedModel) -> set[int]:
    """Token ids generation may ban or force (beginning, end, padding), from the model's configs."""
    ids = set()
    for config in (model.config, getattr(model, "generation_config", None)):
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(config, name, None)
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return {int(token) for token in ids if 0 <= int(token) < _vocab_size(model)}


def fit_network(
    collected: _Collected, plan: _Plan, modified: PreTrainedModel, options: NetworkOptions, *, seed: int, progress: bool
) -> tuple[StateNetworkCorrection | None, dict]:
    """The state network trained on the fit share's states (and samples), folded into vocabulary space, reading the
    tokens the fit text used least; none if it did not help on the select share. And its summary."""
    fit = StateData.concatenate([part for part in (collected.fit.states, collected.states_only.states) if part])
    select = collected.select.states
    read_ids = read_tokens(
        _token_counts(plan.shares.fit + plan.shares.select, _vocab_size(modified)),
        _special_ids(modified),
        hidden_size=modified.get_output_embeddings().weight.shape[1],
        seed=seed,
    )
    head = OutputHead.of(modified)
    network_fit = fit_state_network(
        fit,
        select,
        head,
        rank=options.rank,
        width=options.width,
        epochs=options.epochs,
        write_rank=options.write_rank,
        seed=seed,
        progress=progress,
    )
    kept = network_fit.helps or network_fit.epochs == 0  # untrained: the exact identity of equal models
    summary = {**network_fit.to_dict(), "kept": kept}
    if not kept:
        return None, summary
    tensors = vocabulary_tensors(network_fit.network, head, read_ids)
    return StateNetworkCorrection(**{name: tensor.cpu() for name, tensor in tensors.items()}), summary


def keep_if_helping(
    parameters: CorrectionParameters, network_only: CorrectionParameters, select: PairedLogits, families: list[str]
) -> tuple[CorrectionParameters, str | None]:
    """``parameters`` if the families fitted around the network help on the select share beyond noise, else the
    network alone and a note why."""
    _, alone = kl_before_after(select, network_only)
    _, together = kl_before_after(select, parameters)
    difference = (together - alone).double()
    error = paired_standard_error(difference)
    if not difference.any() or -difference.mean().item() > 2 * error:  # all zero: equal models, nothing to choose
        return parameters, None
    return network_only, (
        f"left out {', '.join(families)}: fitted around the state_network they took its KL on the select share "
        f"from {alone.double().mean():.4f} to {together.double().mean():.4f} (± {error:.4f}), no help beyond noise"
    )


def fit_logit_families(
    fit: PairedLogits,
    select: PairedLogits,
    families: list[str],
    network: StateNetworkCorrection | None,
    modified: PreTrainedModel,
    options: LogitFitOptions,
    seed: int,
) -> tuple[CorrectionParameters, list[str]]:
    """``families`` fitted on ``fit`` around the network's correction, if any (they fit on the scores it
    corrected), and dropped again, with a note, if they do not help it on ``select``."""
    network_only = CorrectionParameters(_vocab_size(modified), [network] if network else [])
    corrected_fit, corrected_select = fit, select
    if network:

        def correct(logits: torch.Tensor) -> torch.Tensor:
            return logits + network.term(logits)

        corrected_fit, corrected_select = fit.with_modified_logits(correct), select.with_modified_logits(correct)
    parameters = fit_correction(
        corrected_fit,
        families,
        output_embeddings=modified.get_output_embeddings().weight,
        select=corrected_select,
        rank=options.rank,
        regularization=options.regularization,
        max_iterations=options.max_iterations,
        seed=seed,
    )
    parameters = parameters.with_families(network_only)
    if not network:
        return parameters, []
    parameters, note = keep_if_helping(parameters, network_only, select, families)
    return parameters, [note] if note else []


# ----------------------------------------------------------------------------------------------------- judge


def paired_standard_error(difference: torch.Tensor) -> float:
    """Batch-means standard error of the mean of per-token paired differences (``[N]``, in text order): neighbouring
    tokens' differences are correlated, and the i.i.d. error would understate it."""
    return block_standard_error(difference.double().cpu().numpy())


def judge(
    reference: PreTrainedModel, modified: PreTrainedModel, parameters: CorrectionParameters, report: list[Window]
) -> dict:
    """The correction's figures on the report share: KL mean and PPL ratio without and with it, from one pass of
    both models (:func:`~hemorrhage_hf.measurement.engine.measure`, the figures ``report`` gives)."""
    processor = DecodingCorrection(parameters)
    measured = measure(
        reference, modified, report, progress=False, modified_variants={"corrected": processor.correct_sequence}
    )
    plain, corrected = measured.figures, measured.variants["corrected"].figures
    difference = torch.from_numpy(measured.variants["corrected"].tokens.kl - measured.tokens.kl)
    return {
        "report_tokens": plain["n_tokens"],
        "kl_before": plain["kl_mean"],
        "kl_after": corrected["kl_mean"],
        "kl_difference_error": paired_standard_error(difference),
        "ppl_ratio_before": plain["ppl_ratio"],
        "ppl_ratio_after": corrected["ppl_ratio"],
    }


# ----------------------------------------------------------------------------------------------------- the whole fit


def _check_request(reference: PreTrainedModel, modified: PreTrainedModel, families: tuple, network: NetworkOptions):
    reference_size, modified_size = _vocab_size(reference), _vocab_size(modified)
    if reference_size != modified_size:
        raise TokenizerMismatchError(
            f"the models score different vocabularies ({reference_size} vs {modified_size} tokens); a correction "
            "maps one model's scores onto the other's, token by token, so they must share a vocabulary"
        )
    if network.sampled_tokens < 0:
        raise CorrectionError(f"sampled_tokens must be 0 or more, got {network.sampled_tokens}")
    if network.sampled_tokens and "state_network" not in families:
        raise CorrectionError("sampled_tokens adds text to the state_network's fit; add state_network to the families")


@dataclass
class _Plan:
    """The shares, and within the fit share the windows whose logits are kept and those kept as states only."""

    shares: Shares
    fit_logits: list[Window]
    fit_states_only: list[Window]
    samples: list[Window] = field(default_factory=list)


def _plan(shares: Shares, families: tuple[str, ...], seed: int) -> _Plan:
    """Without the state network every fit window keeps its logits. With it, a spread part of the fit share does
    (:data:`LOGIT_MAX_TOKENS` less the held-out shares; none without other families) and the rest is kept as
    states, for the network."""
    if "state_network" not in families:
        return _Plan(shares, shares.fit, [])
    held_out = sum(shares.tokens[1:])
    budget = max(LOGIT_MAX_TOKENS - held_out, MIN_FIT_TOKENS) if set(families) - {"state_network"} else 0
    return _Plan(shares, *divide(shares.fit, budget, seed))


def fit_families(
    modified: PreTrainedModel,
    plan: _Plan,
    collected: _Collected,
    families: tuple[str, ...],
    logit_fit: LogitFitOptions,
    network: NetworkOptions,
    *,
    seed: int,
    progress: bool,
) -> tuple[CorrectionParameters, dict | None, list[str]]:
    """The correction (the state network first, if asked for, then the families fitted on logits around it), the
    network's summary, and notes on what was left out and why."""
    network_correction, network_summary, notes = None, None, []
    if "state_network" in families:
        network_correction, network_summary = fit_network(
            collected, plan, modified, network, seed=seed, progress=progress
        )
        notes += [] if network_summary["kept"] else [_network_left_out(network_summary)]
    logit_families = [family for family in families if family != "state_network"]
    if not logit_families:
        network_only = [network_correction] if network_correction else []
        return CorrectionParameters(_vocab_size(modified), network_only), network_summary, notes
    parameters, more_notes = fit_logit_families(
        collected.fit.logits, collected.select.logits, logit_families, network_correction, modified, logit_fit, seed
    )
    return parameters, network_summary, notes + more_notes


def fit_processor(
    reference: PreTrainedModel,
    modified: PreTrainedModel,
    text: FitText,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    families: Sequence[str] = DEFAULT_FAMILIES,
    window: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1,
    logit_fit: LogitFitOptions = LogitFitOptions(),
    network: NetworkOptions = NetworkOptions(),
    seed: int = 0,
    metadata: dict | None = None,
    progress: bool = True,
) -> DecodingCorrection:
    """Fit a correction of ``modified`` towards ``reference`` on ``text``, judged on documents it never used.

    Args:
        text: a text (its WikiText-style articles are its documents; a text without them is cut into contiguous
            parts), a list of independent texts (these two need ``tokenizer``), a ``[n, length]`` LongTensor of
            token ids (a document per row), or windows (cut into contiguous parts).
        families: corrections to fit, from :data:`~hemorrhage_hf.correction.corrections.FAMILIES`.
        window, stride: tokens per model input, and how far apart inputs start, when ``text`` is text.
        max_tokens: tokens read over the three shares, in windows drawn from all over each; by default
            :data:`DEFAULT_MAX_TOKENS`, or :data:`NETWORK_MAX_TOKENS` with the ``state_network``. The families
            fitted on logits keep both models' fp16 logits, 4 bytes × vocabulary per token (3.2 GB for 16,384
            tokens of a 49k vocabulary); with the ``state_network`` only :data:`LOGIT_MAX_TOKENS` of them are, the
            rest as 2 × hidden fp32 numbers per token.
        logit_fit: rank, regularization and L-BFGS iterations of the families fitted on logits.
        network: the ``state_network``'s shape, training and extra sampled text.
        metadata: carried into the saved config (what was compared, on which text).

    The ``state_network`` is fitted first, and kept only if it helps on the select share by itself; the other
    families are then fitted on the scores it corrected, and kept only if they help it there too.
    """
    families = tuple(families)
    _check_request(reference, modified, families, network)
    if max_tokens is None:
        max_tokens = NETWORK_MAX_TOKENS if "state_network" in families else DEFAULT_MAX_TOKENS
    shares = plan_shares(as_documents(text, tokenizer, window=window, stride=stride), max_tokens, seed)
    plan = _plan(shares, families, seed)
    if network.sampled_tokens:
        plan.samples = sample_windows(
            reference, shares.fit, tokens=network.sampled_tokens, window=window, seed=seed, progress=progress
        )
    collected = _collect_shares(reference, modified, plan, batch_size, families, progress)
    parameters, network_summary, notes = fit_families(
        modified, plan, collected, families, logit_fit, network, seed=seed, progress=progress
    )
    summary = FitSummary(
        families=list(parameters.families),
        fit_tokens=shares.tokens[0] + sum(w.n_scored for w in plan.samples),
        select_tokens=shares.tokens[1],
        documents=list(shares.documents),
        sampled_tokens=sum(w.n_scored for w in plan.samples),
        metadata=dict(metadata or {}),
        network=network_summary,
        notes=notes,
        **judge(reference, modified, parameters, shares.report),
    )
    if summary.kl_before > 0 and not summary.helps:
        warnings.warn(summary.verdict(), CorrectionWarning, stacklevel=3)
    return DecodingCorrection(parameters, summary=summary)


@dataclass
class _Collected:
    fit: Collected  # the fit windows that keep logits
    states_only: Collected  # the fit windows (and samples) kept as states only
    select: Collected


def _collect_shares(
    reference: PreTrainedModel,
    modified: PreTrainedModel,
    plan: _Plan,
    batch_size: int,
    families: tuple[str, ...],
    progress: bool,
) -> _Collected:
    """Predictions on the fit windows with logits, on those kept as states (and samples), and on the select share
    (with logits only where families are fitted on them)."""
    head = OutputHead.of(modified) if "state_network" in families else None
    with_logits = bool(set(families) - {"state_network"})
    windows = plan.fit_logits + plan.fit_states_only + plan.samples + plan.shares.select
    bar = tqdm(total=len(windows), desc="correction: collecting predictions", unit="window", disable=not progress)
    with bar:
        return _Collected(
            collect(reference, modified, plan.fit_logits, batch_size, bar, head=head),
            collect(
                reference, modified, plan.fit_states_only + plan.samples, batch_size, bar, head=head, keep_logits=False
            ),
            collect(reference, modified, plan.shares.select, batch_size, bar, head=head, keep_logits=with_logits),
        )


def _network_left_out(network: dict) -> str:
    return (
        f"the state_network was left out: on the {network['validation_tokens']} tokens of the select share it took "
        f"the KL from {network['kl_before']:.4f} to {network['kl_after']:.4f} "
        f"(± {network['kl_difference_error']:.4f}), no help beyond noise (more text helps it)"
    )
