"""The ``state_network`` correction family: a small non-linear map of the modified model's final hidden state,
trained on the KL itself over much more text than the other families can keep.

Pruning changes the final hidden state in ways a linear map barely undoes, and a non-linear map of the state
learns much more of that change, given much more text (docs/correction-history.md). A network needs hundreds of
thousands of predictions, and a prediction's logits are 4 bytes × vocabulary (both models in fp16; 196 KB for
SmolLM2): so the fit keeps, per prediction, only what the KL needs of the two models (:class:`StateData`,
2 × hidden + 1 numbers)::

    KL(P_ref ‖ softmax(h' Eᵀ + b)) = Σ p log p − p·b − h'·(Σ_v p_v E_v) + logsumexp(h' Eᵀ + b)

with ``p`` the reference's next-token distribution, ``E``/``b`` the modified model's output head and ``h'`` the
corrected state. The network reads ``h`` through a rank-``r`` bottleneck (started at the state's principal
directions) and writes back through another of rank ``k ≤ r`` (``r`` in training; a fit may then cut it to the
``k`` directions of its change that move the KL most, :meth:`StateNetwork.cut_write`); in generation it reads
``h`` from a few thousand of the scores and writes through one ``[k × vocab]`` product (:func:`vocabulary_tensors`)::

    u  = ((h − μ) / σ) Pᵀ + p₀                                    # [r]: what the network reads
    Δh = (u Lᵀ + W₂ gelu(W₁ u + w₁) + w₂) Qᵀ                      # [k] written through Q; zero at the start

Example:
    >>> import torch
    >>> from hemorrhage_hf.correction.network import StateNetwork
    >>> network = StateNetwork(hidden_size=8, rank=2, width=16, mean=torch.zeros(8), scale=torch.ones(8))
    >>> torch.equal(network(torch.randn(3, 8)), torch.zeros(3, 8))
    True
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn
from tqdm.auto import tqdm

from ..measurement.statistics import block_standard_error

#: Bottleneck of the network: the directions of the hidden state it reads and writes. A full-width read and write
#: would cost two [vocab × hidden] products a generation step, a large share of a small model's step, for a little
#: more than a bottleneck trained as one keeps.
DEFAULT_NETWORK_RANK = 128
#: Scores the processor reads the state from (:func:`read_tokens`): any ``hidden + 1`` with independent output
#: embeddings determine it; a few thousand make the read well-conditioned and cost a small part of reading them all.
READ_TOKENS = 4096
#: Hidden units between the bottlenecks.
DEFAULT_NETWORK_WIDTH = 1024
DEFAULT_EPOCHS = 3
#: Predictions per optimiser step; each step holds a [batch × vocab] softmax and its gradient.
BATCH_SIZE = 256
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.01


@dataclass
class StateData:
    """Per prediction, what the KL between the reference and a corrected modified model needs (module docstring):
    the modified model's final hidden state, the reference's expected output embedding ``Σ_v p_v E_v`` under the
    modified head, and ``Σ p log p − p·b``. Two identical models give ``modified_states`` from which the KL is 0."""

    modified_states: torch.Tensor  # [N, hidden] fp32
    reference_expected_embedding: torch.Tensor  # [N, hidden] fp32
    reference_constant: torch.Tensor  # [N] fp64: Σ p log p − p·b, large terms that cancel in the KL
    identical: torch.Tensor  # [N] bool: the two models' logits were equal, bit for bit

    def __len__(self) -> int:
        return len(self.reference_constant)

    @classmethod
    def from_predictions(
        cls,
        reference_logits: torch.Tensor,
        modified_logits: torch.Tensor,
        modified_states: torch.Tensor,
        head: OutputHead,
        chunk_size: int = 256,
    ) -> StateData:
        """From both models' ``[n, vocab]`` logits and the ``[n, hidden]`` states the modified head read."""
        expected, constant = [], []
        for start in range(0, len(reference_logits), chunk_size):
            logprobs = torch.log_softmax(reference_logits[start : start + chunk_size].float(), -1)
            probs = logprobs.exp()
            expected.append(probs @ head.weight)
            entropy_term = torch.where(probs > 0, probs * logprobs, torch.zeros_like(probs)).sum(-1)
            constant.append(entropy_term.double() - (probs @ head.bias).double())
        identical = (reference_logits == modified_logits).all(-1)
        return cls(modified_states.float(), torch.cat(expected), torch.cat(constant), identical)

    @classmethod
    def empty(cls, size: int, hidden_size: int, device: torch.device) -> StateData:
        """Room for ``size`` predictions, filled window by window with :meth:`write`.

        One allocation for a whole collection: a hidden-sized part kept per window, between the window's
        vocabulary-sized temporaries, fragmented glibc's heap so that it grew by 24 MiB a window (SmolLM2, a
        524k-token fit: 12 GB resident after 410 windows, 2.8 GB once ``malloc_trim`` returned the free heap)."""
        return cls(
            torch.empty(size, hidden_size, device=device),
            torch.empty(size, hidden_size, device=device),
            torch.empty(size, dtype=torch.float64, device=device),
            torch.empty(size, dtype=torch.bool, device=device),
        )

    def write(self, start: int, part: StateData) -> None:
        """Copy ``part`` into rows ``start : start + len(part)``."""
        for column in fields(self):
            getattr(self, column.name)[start : start + len(part)] = getattr(part, column.name)

    @classmethod
    def concatenate(cls, parts: list[StateData]) -> StateData:
        return cls(*(torch.cat([getattr(part, f.name) for part in parts]) for f in fields(cls)))

    def kl(self, states: torch.Tensor, head: OutputHead, rows: slice = slice(None)) -> torch.Tensor:
        """Per-prediction KL(P_ref ‖ softmax(states Eᵀ + b)), ``states`` standing in for ``modified_states[rows]``."""
        normaliser = torch.logsumexp(torch.addmm(head.bias, states, head.weight.T), -1)
        cross = (states * self.reference_expected_embedding[rows]).sum(-1)
        return (self.reference_constant[rows] + (normaliser - cross).double()).float()


@dataclass
class OutputHead:
    """The modified model's output head as the fit reads it: scores = states @ weight.T + bias."""

    weight: torch.Tensor  # [vocab, hidden]
    bias: torch.Tensor  # [vocab]; zeros for a head without bias
    #: The dtype the model computes its scores in, which training's ``[batch × vocab]`` products use too: in
    #: bfloat16 they train the same network about twice as fast on CPUs with bfloat16 matrix units.
    product_dtype: torch.dtype = torch.float32

    @classmethod
    def of(cls, model: nn.Module) -> OutputHead:
        head = model.get_output_embeddings()
        weight = head.weight.detach()
        bias = head.bias if getattr(head, "bias", None) is not None else torch.zeros(weight.shape[0])
        return cls(weight.float(), bias.detach().float().to(weight.device), product_dtype=weight.dtype)

    def __post_init__(self) -> None:
        self.product_weight = self.weight.to(self.product_dtype)  # the same tensor when fp32

    def training_scores(self, states: torch.Tensor) -> torch.Tensor:
        """``states @ weight.T + bias`` in fp32, the product computed in :attr:`product_dtype`."""
        return (states.to(self.product_dtype) @ self.product_weight.T).float() + self.bias


class StateNetwork(nn.Module):
    """``Δh`` of the module docstring. Every path into the output starts at zero: untrained, it is the identity."""

    def __init__(self, *, hidden_size: int, rank: int, width: int, mean: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("scale", scale.float())
        self.read = nn.Linear(hidden_size, rank)
        self.linear = nn.Linear(rank, rank)
        self.up = nn.Linear(rank, width)
        self.down = nn.Linear(width, rank)
        self.write = nn.Linear(rank, hidden_size, bias=False)
        for layer in (self.linear, self.down):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.write.weight, std=rank**-0.5)

    @torch.no_grad()
    def read_principal_directions(self, states: torch.Tensor) -> None:
        """Start the read at the ``rank`` principal directions of the standardised ``states``: from a random read
        the network ended lower than from a random read of as many or more directions."""
        standardised = (states - self.mean) / self.scale
        directions = torch.linalg.svd(standardised, full_matrices=False).Vh[: self.read.out_features]
        self.read.weight.copy_(directions)
        self.read.bias.zero_()

    def bottleneck(self, states: torch.Tensor) -> torch.Tensor:
        """``[..., rank]``: the output before it is written back into the hidden space."""
        read = self.read((states - self.mean) / self.scale)
        return self.linear(read) + self.down(nn.functional.gelu(self.up(read)))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.write(self.bottleneck(states))

    @torch.no_grad()
    def cut_write(self, states: torch.Tensor, write_rank: int, head: OutputHead) -> None:
        """Write only along the ``write_rank`` directions of the network's change on ``states`` that move the
        corrected model's scores most, refactored so that the bottleneck ends in ``write_rank`` numbers (the
        processor's ``[rank × vocab]`` product becomes ``[write_rank × vocab]``).

        "Most" is measured in the KL's own metric (:func:`output_metric`, ``F = G²``): the cut is the best rank-``k``
        approximation of ``Δh G``, written back through ``G⁻¹``, ``Δh ← Δh G V Vᵀ G⁻¹``: it loses less of what the
        network removes than a cut to the principal directions of ``Δh`` itself, and a network trained at the lower
        rank removes less than one trained at the higher rank and cut.
        """
        change = self(states)
        root, inverse_root = _matrix_roots(output_metric(states + change, head))
        directions = torch.linalg.svd(change @ root, full_matrices=False).Vh[:write_rank].T  # V: [hidden, k]
        compact = directions.T @ root @ self.write.weight  # [k, rank]: the bottleneck's output in V's coordinates
        self.linear = _composed(self.linear, compact)
        self.down = _composed(self.down, compact)
        self.write = nn.Linear(write_rank, directions.shape[0], bias=False).to(directions.device)
        self.write.weight.copy_(inverse_root @ directions)


#: States the KL's metric is averaged over (each costs a [vocab] softmax).
METRIC_SAMPLE = 8192


def output_metric(states: torch.Tensor, head: OutputHead, chunk_size: int = 256) -> torch.Tensor:
    """``[hidden, hidden]``: the KL's second-order change when the states move by ``δ`` is ``½ δ F δᵀ``, with
    ``F = E[Eᵀ (diag(q) − q qᵀ) E]`` over the first :data:`METRIC_SAMPLE` of ``states`` and ``q`` the head's
    distribution at each (whatever the reference's distribution: the KL's Hessian in the scores is softmax's)."""
    states = states[:METRIC_SAMPLE]
    probability_mass = torch.zeros(head.weight.shape[0], dtype=torch.float64, device=states.device)
    expected_outer = torch.zeros(states.shape[1], states.shape[1], dtype=torch.float64, device=states.device)
    for start in range(0, len(states), chunk_size):
        probs = torch.softmax(torch.addmm(head.bias, states[start : start + chunk_size], head.weight.T), -1)
        probability_mass += probs.sum(0).double()
        expected = (probs @ head.weight).double()  # [chunk, hidden]: Σ_v q_v E_v
        expected_outer += expected.T @ expected
    weight = head.weight.double()
    return ((weight.T * probability_mass) @ weight - expected_outer) / len(states)


def _matrix_roots(metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``G`` and ``G⁻¹`` in fp32 with ``G² = metric``; directions the scores do not see (a shift of all of
    them) get a floor, so that ``G⁻¹`` stays finite."""
    values, vectors = torch.linalg.eigh(metric)
    roots = values.clamp_min(values.max() * 1e-9).sqrt()
    return ((vectors * roots) @ vectors.T).float(), ((vectors / roots) @ vectors.T).float()


def _composed(layer: nn.Linear, after: torch.Tensor) -> nn.Linear:
    """``x ↦ after @ layer(x)`` as one linear layer."""
    composed = nn.Linear(layer.in_features, after.shape[0]).to(after.device)
    composed.weight.copy_(after @ layer.weight)
    composed.bias.copy_(after @ layer.bias)
    return composed


@dataclass
class NetworkFit:
    """A trained network and what it did on held-out predictions (the fit keeps it only if it helped)."""

    network: StateNetwork
    validation_tokens: int
    kl_before: float
    kl_after: float
    kl_difference_error: float  # batch-means standard error of the mean per-token (after − before)
    epochs: int
    fit_tokens: int

    @property
    def helps(self) -> bool:
        """The held-out KL fell by more than two standard errors of the paired difference."""
        return self.kl_before - self.kl_after > 2 * self.kl_difference_error

    def to_dict(self) -> dict:
        return {
            "fit_tokens": self.fit_tokens,
            "validation_tokens": self.validation_tokens,
            "epochs": self.epochs,
            "kl_before": self.kl_before,
            "kl_after": self.kl_after,
            "kl_difference_error": self.kl_difference_error,
            "helps": self.helps,
        }


def fit_state_network(
    fit: StateData,
    validation: StateData,
    head: OutputHead,
    *,
    rank: int = DEFAULT_NETWORK_RANK,
    width: int = DEFAULT_NETWORK_WIDTH,
    epochs: int = DEFAULT_EPOCHS,
    write_rank: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> NetworkFit:
    """Train a :class:`StateNetwork` on ``fit`` minimising the mean KL, with AdamW and a one-cycle learning rate
    (docs/correction-history.md), and judge it on ``validation`` (the select share). A ``write_rank`` below
    ``rank`` cuts the trained network's write to that many directions (:meth:`StateNetwork.cut_write`) before
    it is judged: what the processor costs a generation step scales with it.

    Two models whose logits are equal on ``fit`` get the untrained network, the exact identity: Adam would
    otherwise turn rounding-level gradients of the KL into full-size steps.
    """
    hidden_size = fit.modified_states.shape[1]
    if not 0 < rank <= hidden_size:
        raise ValueError(f"the state_network rank must be in 1..{hidden_size} (the hidden size), got {rank}")
    if write_rank is not None and not 0 < write_rank <= rank:
        raise ValueError(f"the state_network write rank must be in 1..{rank} (its rank), got {write_rank}")
    generator = torch.Generator().manual_seed(seed)
    states = fit.modified_states
    network = _seeded_network(states, rank=rank, width=width, seed=seed)
    already_equal = bool(fit.identical.all())
    steps_per_epoch = max(len(fit) // BATCH_SIZE, 1)
    if not already_equal and epochs > 0:
        _train(
            network, fit, head, epochs=epochs, steps_per_epoch=steps_per_epoch, generator=generator, progress=progress
        )
        if write_rank is not None and write_rank < rank:
            network.cut_write(states[_sample(len(states), seed).to(states.device)], write_rank, head)
    network.eval()
    with torch.no_grad():
        before, after = [], []
        for start in range(0, len(validation), BATCH_SIZE):
            rows = slice(start, start + BATCH_SIZE)
            batch = validation.modified_states[rows]
            before.append(validation.kl(batch, head, rows))
            after.append(validation.kl(batch + network(batch), head, rows))
    before, after = torch.cat(before).double(), torch.cat(after).double()
    difference = after - before
    return NetworkFit(
        network=network,
        validation_tokens=len(validation),
        kl_before=before.mean().item(),
        kl_after=after.mean().item(),
        kl_difference_error=block_standard_error(difference.numpy()),
        epochs=0 if already_equal else epochs,
        fit_tokens=len(fit),
    )


#: States the principal directions are read from, and those of the change a write is cut to (an SVD of all of
#: them would cost more than it tells).
PRINCIPAL_SAMPLE = 65536


def _seeded_network(states: torch.Tensor, *, rank: int, width: int, seed: int) -> StateNetwork:
    torch.manual_seed(seed)  # nn.Linear draws its initial weights from the global generator
    network = StateNetwork(
        hidden_size=states.shape[1], rank=rank, width=width, mean=states.mean(0), scale=states.std(0).clamp_min(1e-6)
    ).to(states.device)
    network.read_principal_directions(states[_sample(len(states), seed).to(states.device)])
    return network


def _sample(count: int, seed: int) -> torch.Tensor:
    """Up to :data:`PRINCIPAL_SAMPLE` of ``count`` rows, at random."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:PRINCIPAL_SAMPLE]


def _train(
    network: StateNetwork,
    fit: StateData,
    head: OutputHead,
    *,
    epochs: int,
    steps_per_epoch: int,
    generator: torch.Generator,
    progress: bool,
) -> None:
    optimizer = torch.optim.AdamW(network.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, total_steps=epochs * steps_per_epoch
    )
    network.train()
    # Callers may sit under no_grad (pipelines do); training needs gradients whatever the context.
    with (
        torch.enable_grad(),
        tqdm(
            total=epochs * steps_per_epoch,
            desc="correction: training state_network",
            unit="step",
            disable=not progress,
        ) as bar,
    ):
        for _ in range(epochs):
            order = torch.randperm(len(fit), generator=generator).to(fit.modified_states.device)
            for step in range(steps_per_epoch):
                rows = order[step * BATCH_SIZE : (step + 1) * BATCH_SIZE]
                states = fit.modified_states[rows]
                corrected = states + network(states)
                normaliser = torch.logsumexp(head.training_scores(corrected), -1)
                # The constant Σ p log p − p·b is left out: it has no gradient.
                loss = (normaliser - (corrected * fit.reference_expected_embedding[rows]).sum(-1)).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()


def read_tokens(token_counts: torch.Tensor, excluded: set[int], *, hidden_size: int, seed: int = 0) -> torch.Tensor:
    """The :data:`READ_TOKENS` tokens (at least ``hidden_size + 1``) the processor reads the state from: those the
    fit text used least (``token_counts``, ``[vocab]``), ties at random, never one of ``excluded``.

    Rare tokens are the ones earlier processors leave alone (a repetition penalty changes the scores of tokens
    already in the text; generation bans special tokens), and SmolLM2's least-used tokens pin the state down about
    as well as its whole vocabulary does (condition number of ``[E, 1]``: 181 for the 4,096 that the first 262k
    tokens of WikiText-2 used least, 168 for all 49,152).
    """
    vocab_size = len(token_counts)
    count = min(READ_TOKENS, vocab_size - len(excluded))
    if count < hidden_size + 1:
        raise ValueError(
            f"the state network reads the state from at least {hidden_size + 1} tokens; this vocabulary "
            f"has {vocab_size} ({len(excluded)} special ones excluded)"
        )
    tie_break = torch.rand(vocab_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    order_key = token_counts.double() + tie_break
    order_key[list(excluded)] = torch.inf
    return order_key.argsort()[:count].sort().values


def vocabulary_tensors(network: StateNetwork, head: OutputHead, read_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The network as the processor applies it to scores (``CorrectionParameters.state_network_*``).

    The state is read from the scores of ``read_ids`` alone (:func:`read_tokens`): they are ``h Eᵀ + b`` up to a
    constant shift, so least squares over ``[E, 1]`` recovers ``h`` exactly, for a product a few hundredths of the
    vocabulary's size. The standardisation folds into that product, the write into the last: a step costs one
    ``[rank × vocab]`` product and one ``[len(read_ids) × rank]``.
    """
    with torch.no_grad():
        rows = head.weight[read_ids]
        solve = torch.linalg.pinv(torch.cat([rows, torch.ones_like(rows[:, :1])], 1).double())
        reader = solve[:-1].T.float()  # [read tokens, hidden]: h = (scores − b) @ reader
        read_weight = network.read.weight / network.scale  # [rank, hidden]
        offset = -head.bias[read_ids] @ reader - network.mean
        return {
            "state_network_read_ids": read_ids.to(head.weight.device),
            "state_network_in": (reader @ read_weight.T).contiguous(),
            "state_network_in_bias": network.read.bias + offset @ read_weight.T,
            "state_network_linear": network.linear.weight.clone(),
            "state_network_up": network.up.weight.clone(),
            "state_network_up_bias": network.up.bias.clone(),
            "state_network_down": network.down.weight.clone(),
            "state_network_bias": network.linear.bias + network.down.bias,
            "state_network_out": (network.write.weight.T @ head.weight.T).contiguous(),
        }
