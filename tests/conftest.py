"""Shared fixtures. Tests run offline: nothing may reach the Hub, and evaluate's cache lives in a temp folder.

Sizes: heavy tests (marked ``heavy``) read :data:`SCALE`; CI runs them small (the default), and
``HEMORRHAGE_FULL_TESTS=1`` runs them at full size.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Set before transformers/evaluate/huggingface_hub are imported anywhere: they read these at import time.
_HF_HOME = tempfile.mkdtemp(prefix="hemorrhage-test-hf-home-")
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_EVALUATE_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    HF_HOME=_HF_HOME,
    TOKENIZERS_PARALLELISM="false",
)

import pytest  # noqa: E402
import torch  # noqa: E402

#: 1 in CI (small), 4 with HEMORRHAGE_FULL_TESTS=1: multiply token budgets of heavy tests by this.
SCALE = 4 if os.environ.get("HEMORRHAGE_FULL_TESTS") == "1" else 1
SHARED_DATA = Path(os.environ.get("HEMORRHAGE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared_data_path(relative: str) -> Path:
    """A file of ../shared/data; skips the test where it is absent, fails under `make test` (which requires it)."""
    path = SHARED_DATA / relative
    if not path.exists():
        message = f"shared evaluation data not found: {path}"
        if os.environ.get("HEMORRHAGE_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(message + " (`make test` requires ../shared/data)")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, fp32, loaded once per session. Do not modify it
    in place: modifications work on copies (``apply_modification`` copies by default)."""
    from hemorrhage_hf.models import load_model

    torch.manual_seed(0)
    return load_model("default")


@pytest.fixture(scope="session")
def wikitext_text() -> str:
    return shared_data_path("wikitext-2-raw/wiki.valid.raw").read_text(encoding="utf-8")


def tiny_llama(
    n_layers: int = 2, vocab_size: int = 64, hidden: int = 32, heads: int = 4, kv_heads: int = 2, seed: int = 0
):
    """A randomly initialised Llama for tests where only shapes matter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def pair_that_does_not_carry() -> tuple:
    """(reference, modified, ids): tiny Llamas where the modification damages the embeddings of the tokens the fit
    share's documents read and barely touches those of the documents a correction fit holds out (its select and
    report shares, reading only tokens 32..63), so what a fit learns does not carry to them."""
    import copy

    from hemorrhage_hf.correction.fit import share_of_documents

    reference = tiny_llama()
    with torch.no_grad():
        reference.lm_head.weight.mul_(40)  # peaked next-token distributions, so the two models' KL is large
    modified = copy.deepcopy(reference)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        modified.model.embed_tokens.weight[:32] += 0.05 * torch.randn(32, 32, generator=noise)
        modified.model.embed_tokens.weight[32:] += 0.001 * torch.randn(32, 32, generator=noise)
    ids = torch.randint(0, 32, (10, 48), generator=torch.Generator().manual_seed(0))
    held_out = [share > 0 for share in share_of_documents([47] * 10, seed=0)]  # each row is a document
    ids[held_out] += 32
    return reference, modified, ids


class StopAfter:
    """A forward hook that interrupts a build after ``n`` forward passes, as Ctrl-C would."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, module, inputs, output):
        self.calls += 1
        if self.calls > self.n:
            raise KeyboardInterrupt
