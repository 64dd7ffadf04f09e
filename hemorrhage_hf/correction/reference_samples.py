"""Text a model writes itself, after short prompts cut from fit text: more text for the ``state_network``.

The state network is short of text, and text like the one to correct for runs out. The reference's own samples are
text whose next-token distributions the correction must follow by construction; per token they did about as much
for the network as more in-domain text, and more than text of another kind (docs/correction-history.md).

Example:
    >>> from hemorrhage_hf import load_model
    >>> from hemorrhage_hf.corpus import tokenize_corpus
    >>> from hemorrhage_hf.correction.reference_samples import sample_windows
    >>> model, tokenizer = load_model("default")  # doctest: +SKIP
    >>> prompts_from = tokenize_corpus(tokenizer, "Paris is the capital of France. " * 20, window=64)  # doctest: +SKIP
    >>> [window.n_scored for window in sample_windows(model, prompts_from, tokens=64, window=48)]  # doctest: +SKIP
    [16, 16, 16, 16]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel

from ..corpus import Window
from ..errors import CorpusError

#: Tokens of fit text each sample starts from: enough to set a topic, few enough that the sample is the
#: model's own text (the prompt is not scored).
PROMPT_TOKENS = 32
#: Samples generated together: the batch amortises the per-step overhead of ``generate`` on a CPU.
SAMPLE_BATCH = 64


def sample_windows(
    model: PreTrainedModel,
    prompts_from: Sequence[Window],
    *,
    tokens: int,
    window: int,
    prompt_tokens: int = PROMPT_TOKENS,
    batch_size: int = SAMPLE_BATCH,
    seed: int = 0,
    progress: bool = True,
) -> list[Window]:
    """At least ``tokens`` scored tokens of ``model``'s own text, in windows of ``window`` tokens.

    Each window starts with ``prompt_tokens`` tokens cut at a seeded random place of ``prompts_from`` and goes on
    with tokens sampled from the model's full distribution (temperature 1, no top-k or top-p: the distribution a
    correction towards this model follows); only the sampled tokens are scored. The global random state is left
    as it was.
    """
    if tokens <= 0:
        raise ValueError(f"tokens must be positive, got {tokens}")
    if window <= prompt_tokens:
        raise CorpusError(
            f"sampled windows of {window} tokens leave nothing to sample after a {prompt_tokens}-token "
            "prompt; use a longer window"
        )
    sources = [w.input_ids for w in prompts_from if len(w.input_ids) >= prompt_tokens]
    if not sources:
        raise CorpusError(f"no fit window has the {prompt_tokens} tokens a sample's prompt needs")
    count = math.ceil(tokens / (window - prompt_tokens))
    prompts = _prompts(sources, count, prompt_tokens, seed)
    config = _sampling_config(model, window - prompt_tokens)
    samples = []
    with (
        torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []),
        tqdm(total=count, desc="correction: sampling the reference", unit="window", disable=not progress) as bar,
    ):
        torch.manual_seed(seed)
        for start in range(0, count, batch_size):
            batch = prompts[start : start + batch_size].to(model.device)
            samples += model.generate(batch, attention_mask=torch.ones_like(batch), generation_config=config).cpu()
            bar.update(len(batch))
    return [Window(sample, first_scored=prompt_tokens) for sample in samples]


def _prompts(sources: list[torch.Tensor], count: int, prompt_tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([len(source) - prompt_tokens + 1 for source in sources], dtype=torch.float64)
    chosen = torch.multinomial(lengths, count, replacement=True, generator=generator)  # every start equally likely
    starts = (torch.rand(count, generator=generator, dtype=torch.float64) * lengths[chosen]).long()
    return torch.stack(
        [sources[source][start : start + prompt_tokens] for source, start in zip(chosen.tolist(), starts.tolist())]
    )


def _sampling_config(model: PreTrainedModel, new_tokens: int) -> GenerationConfig:
    """Plain sampling whatever the model's own generation settings; every sample runs its full length."""
    own = model.generation_config
    # Prompts of one length that all run the full length are never padded: the pad id only keeps generate quiet.
    pad = 0 if own.pad_token_id is None else own.pad_token_id
    return GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        eos_token_id=own.eos_token_id,
        pad_token_id=pad,
    )
