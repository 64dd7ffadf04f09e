"""The state_network family: its arithmetic (the KL from states, the network folded into vocabulary space), what it
learns that a linear state map cannot, when the fit leaves it out, save/load, and the models it refuses."""

import copy

import pytest
import torch
from conftest import pair_that_does_not_carry, tiny_llama

from hemorrhage_hf.correction.corrections import CorrectionParameters, StateNetworkCorrection, TokenBias
from hemorrhage_hf.correction.fit import LogitFitOptions, NetworkOptions, collect, keep_if_helping
from hemorrhage_hf.correction.network import (
    OutputHead,
    StateData,
    StateNetwork,
    output_metric,
    read_tokens,
    vocabulary_tensors,
)
from hemorrhage_hf.correction.ops import PairedLogits
from hemorrhage_hf.correction.processor import CorrectionWarning, DecodingCorrection
from hemorrhage_hf.errors import CorrectionError
from hemorrhage_hf.measurement.divergence import kl_divergence, log_probs

NETWORK = NetworkOptions(rank=16, width=64)
TRAINED_LONGER = NetworkOptions(rank=16, width=64, epochs=5)


def _random_head(vocab: int, hidden: int, generator: torch.Generator) -> OutputHead:
    return OutputHead(torch.randn(vocab, hidden, generator=generator), torch.randn(vocab, generator=generator))


def _pruned_mlp_pair(seed: int = 1):
    """A tiny Llama and a copy with half of every MLP weight zeroed: a change of the final state no linear map
    undoes."""
    reference = tiny_llama()
    with torch.no_grad():
        reference.lm_head.weight.mul_(40)  # peaked next-token distributions, so the two models' KL is large
    modified = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in modified.named_parameters():
            if ".mlp." in name:
                weight.mul_((torch.rand(weight.shape, generator=generator) > 0.5).float())
    return reference, modified


def test_state_data_gives_the_kl_of_the_two_models_logits():
    vocab, hidden, count = 64, 16, 40
    generator = torch.Generator().manual_seed(0)
    head = _random_head(vocab, hidden, generator)
    states = torch.randn(count, hidden, generator=generator)
    modified_logits = states @ head.weight.T + head.bias
    reference_logits = modified_logits + torch.randn(count, vocab, generator=generator)
    data = StateData.from_predictions(reference_logits, modified_logits, states, head, chunk_size=16)
    expected = kl_divergence(log_probs(reference_logits), log_probs(modified_logits))
    torch.testing.assert_close(data.kl(states, head), expected, rtol=1e-4, atol=1e-5)
    assert not data.identical.any()
    assert StateData.from_predictions(modified_logits, modified_logits, states, head).identical.all()


def test_the_network_folded_into_vocabulary_space_corrects_scores_as_it_corrects_states():
    """What generation applies to the scores (the state read from a few of them, the change written through the
    head) equals the network applied to the state behind them, for a head with a bias and scores shifted by a
    constant, one step or whole sequences; a row whose read tokens were banned gets no change."""
    vocab, hidden = 64, 16
    generator = torch.Generator().manual_seed(0)
    head = _random_head(vocab, hidden, generator)
    states = torch.randn(2, 5, hidden, generator=generator) * 2 + 1
    network = StateNetwork(
        hidden_size=hidden,
        rank=4,
        width=32,
        mean=torch.randn(hidden, generator=generator),
        scale=torch.rand(hidden, generator=generator) + 0.5,
    )
    with torch.no_grad():
        for parameter in network.parameters():  # every path live: the zero start would prove nothing
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    counts = torch.randint(0, 100, (vocab,), generator=generator)
    read_ids = read_tokens(counts, {0, 1}, hidden_size=hidden)
    assert len(read_ids) == 62 and not {0, 1} & set(read_ids.tolist())
    parameters = CorrectionParameters(vocab, [StateNetworkCorrection(**vocabulary_tensors(network, head, read_ids))])
    parameters.validate()
    scores = states @ head.weight.T + head.bias + 3.0
    with torch.no_grad():
        expected = network(states) @ head.weight.T
    torch.testing.assert_close(parameters.network.term(scores), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(parameters.network.term(scores[:, -1]), expected[:, -1], rtol=1e-4, atol=1e-4)
    scores[0, 2, read_ids[0]] = -torch.inf
    term = parameters.network.term(scores)
    assert not term[0, 2].any() and term[0, 1].abs().sum() > 0
    assert parameters.network.shape == (4, 32) and not parameters.is_identity()


def test_the_output_metric_is_the_kls_hessian_in_the_state():
    vocab, hidden = 40, 6
    generator = torch.Generator().manual_seed(0)
    head = _random_head(vocab, hidden, generator)
    states = torch.randn(5, hidden, generator=generator, dtype=torch.float64)
    weight, bias = head.weight.double(), head.bias.double()

    def kl_from(state: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        scores = state @ weight.T + bias
        return kl_divergence(log_probs(scores), log_probs(scores + shift @ weight.T))

    hessians = [
        torch.autograd.functional.hessian(
            lambda shift, state=state: kl_from(state, shift), torch.zeros(hidden, dtype=torch.float64)
        )
        for state in states
    ]
    torch.testing.assert_close(output_metric(states.float(), head), torch.stack(hessians).mean(0), rtol=1e-4, atol=1e-5)


def test_cutting_the_write_keeps_the_change_that_moves_the_kl_most():
    """The cut network writes a rank-3 part of the trained network's change (at the network's rank, the same
    change), closer in the KL's metric than the change's principal directions, through tensors whose write side
    has that many rows, which still fold into vocabulary space."""
    hidden, rank = 16, 6
    generator = torch.Generator().manual_seed(0)
    head = _random_head(64, hidden, generator)
    network = StateNetwork(hidden_size=hidden, rank=rank, width=32, mean=torch.zeros(hidden), scale=torch.ones(hidden))
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    states = torch.randn(300, hidden, generator=generator)
    with torch.no_grad():
        change = network(states)
        metric = output_metric(states + change, head).float()
        full, cut = copy.deepcopy(network), copy.deepcopy(network)
        full.cut_write(states, rank, head)
        cut.cut_write(states, 3, head)
        torch.testing.assert_close(full(states), change, rtol=1e-4, atol=1e-4)
        assert torch.linalg.matrix_rank(cut(states)) == 3

        def metric_error(approximation: torch.Tensor) -> float:
            residual = change - approximation
            return (residual @ metric * residual).sum().item()

        principal = torch.linalg.svd(change, full_matrices=False).Vh[:3].T
        assert metric_error(cut(states)) < 0.9 * metric_error(change @ principal @ principal.T)
        assert metric_error(cut(states)) > 0.01 * metric_error(torch.zeros_like(change))  # a real cut
    network = StateNetworkCorrection(**vocabulary_tensors(cut, head, torch.arange(40)))
    CorrectionParameters(64, [network]).validate()
    assert network.shape == (rank, 32) and network.write_rank == 3
    with torch.no_grad():
        torch.testing.assert_close(
            network.term(states @ head.weight.T + head.bias),
            cut(states) @ head.weight.T,
            rtol=1e-4,
            atol=1e-4,
        )


def test_the_least_used_tokens_are_read():
    counts = torch.tensor([5, 0, 3, 0, 9, 1, 2, 7])
    assert read_tokens(counts, {1}, hidden_size=2).tolist() == [0, 2, 3, 4, 5, 6, 7]  # 7 ≤ 4,096: all but 1
    with pytest.raises(ValueError, match="at least 9 tokens"):
        read_tokens(counts, set(), hidden_size=8)


def test_the_network_undoes_on_held_out_windows_what_the_linear_state_map_cannot():
    reference, modified = _pruned_mlp_pair()
    ids = torch.randint(0, 64, (200, 40), generator=torch.Generator().manual_seed(0))
    linear = DecodingCorrection.fit(
        reference, modified, ids, families=("state_bias",), logit_fit=LogitFitOptions(rank=32), progress=False
    )
    network = DecodingCorrection.fit(
        reference, modified, ids, families=("state_network",), network=TRAINED_LONGER, progress=False
    )
    assert network.families == ("state_network",)
    # The fit share holds 3 rows in 5 (each row a document of 39 scored tokens).
    assert network.summary.network["kept"] and network.summary.network["fit_tokens"] == 120 * 39
    assert network.summary.kl_reduction > 0.5, network.summary.verdict()
    assert network.summary.kl_reduction > linear.summary.kl_reduction + 0.2, (
        linear.summary.verdict(),
        network.summary.verdict(),
    )


def test_the_fit_leaves_the_network_out_when_it_does_not_help_on_held_out_windows():
    """The modification damages the embeddings of the tokens the fit windows read and barely touches those of the
    held-out windows: what the network learns does not carry, and the fit drops it and says so."""
    reference, modified, ids = pair_that_does_not_carry()
    with pytest.warns(CorrectionWarning, match="state_network was left out"):
        correction = DecodingCorrection.fit(
            reference, modified, ids, families=("state_network",), network=NETWORK, progress=False
        )
    assert correction.families == () and correction.is_identity()
    assert correction.summary.network["kept"] is False and not correction.summary.network["helps"]


def test_families_fitted_around_the_network_are_kept_only_if_they_help_on_held_out_windows():
    """The gate behind ``fit``: a token bias that is the true difference between the models stays; one that moves
    the scores elsewhere is dropped, the network alone kept, and the note says what each gave."""
    vocab, count = 64, 400
    generator = torch.Generator().manual_seed(0)
    modified_logits = torch.randn(count, vocab, generator=generator) * 3
    difference = torch.randn(vocab, generator=generator)
    validation = PairedLogits.from_logits(
        modified_logits + difference, modified_logits, torch.zeros(count, dtype=torch.long)
    )
    network_only = CorrectionParameters.identity(("state_network",), vocab_size=vocab, network_shape=(4, 8))
    helping = network_only.with_families([TokenBias(difference.clone())])
    kept, note = keep_if_helping(helping, network_only, validation, ["token_bias"])
    assert kept is helping and note is None
    hurting = network_only.with_families([TokenBias(-difference)])
    kept, note = keep_if_helping(hurting, network_only, validation, ["token_bias"])
    assert kept is network_only and note.startswith("left out token_bias: fitted around the state_network")


def test_saved_network_reloads_and_corrects_the_same(tmp_path):
    reference, modified = _pruned_mlp_pair()
    ids = torch.randint(0, 64, (40, 40), generator=torch.Generator().manual_seed(0))
    correction = DecodingCorrection.fit(
        reference,
        modified,
        ids,
        families=("token_bias", "state_network"),
        network=NetworkOptions(rank=16, width=64, write_rank=8),
        progress=False,
    )
    loaded = DecodingCorrection.from_pretrained(correction.save_pretrained(tmp_path), vocab_size=64)
    assert loaded.families == ("token_bias", "state_network")
    assert (loaded.parameters.network.shape, loaded.parameters.network.write_rank) == ((16, 64), 8)
    assert loaded.summary.network == correction.summary.network
    scores = torch.randn(3, 64) * 10
    assert torch.equal(loaded(ids[:3], scores), correction(ids[:3], scores))
    assert not torch.equal(loaded(ids[:3], scores), scores)


def test_bfloat16_models_fit_the_network_their_rounded_scores_are_not_taken_for_a_changed_head():
    """Their training products run in bfloat16 too (OutputHead.product_dtype), within its rounding of fp32's."""
    reference, modified = (model.to(torch.bfloat16) for model in _pruned_mlp_pair())
    head = OutputHead.of(modified)
    assert head.product_dtype == torch.bfloat16 and head.weight.dtype == torch.float32
    states = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    exact = torch.addmm(head.bias, states, head.weight.T)
    torch.testing.assert_close(head.training_scores(states), exact, rtol=0, atol=0.02 * exact.abs().max().item())
    ids = torch.randint(0, 64, (200, 40), generator=torch.Generator().manual_seed(0))
    network = DecodingCorrection.fit(
        reference, modified, ids, families=("state_network",), network=TRAINED_LONGER, progress=False
    )
    assert network.summary.network["kept"] and network.summary.kl_reduction > 0.5, network.summary.verdict()


def test_a_model_that_changes_its_scores_after_the_head_is_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=1.0,
    )
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # scores well into the soft cap's bend
    ids = torch.randint(0, 64, (10, 48), generator=torch.Generator().manual_seed(0))
    with pytest.raises(CorrectionError, match="changes them after its head"):
        DecodingCorrection.fit(model, copy.deepcopy(model), ids, families=("state_network",), progress=False)


def test_collecting_states_keeps_memory_flat_window_after_window():
    """Hundreds of thousands of tokens of states must fit in memory: the resident size grows by the states written
    (~0.3 MiB a window here), not by each window's full-vocabulary temporaries, which glibc's heap kept (it grew by
    up to 24 MiB a window at SmolLM2's vocabulary, by fits and starts)."""
    psutil = pytest.importorskip("psutil")
    from hemorrhage_hf.corpus import make_windows

    reference, modified = tiny_llama(vocab_size=49152, hidden=64), tiny_llama(vocab_size=49152, hidden=64, seed=1)
    windows = make_windows(torch.randint(0, 49152, (512 * 21,), generator=torch.Generator().manual_seed(0)), window=512)
    resident = []

    class RecordingBar:
        def update(self, count: int) -> None:
            resident.append(psutil.Process().memory_info().rss)

    states = collect(
        reference, modified, windows, 1, RecordingBar(), head=OutputHead.of(modified), keep_logits=False
    ).states
    assert len(states) == sum(window.n_scored for window in windows)
    growth_per_window = (resident[-1] - resident[1]) / (len(resident) - 2)
    assert growth_per_window < 2**20, f"{growth_per_window / 2**20:.1f} MiB a window"
