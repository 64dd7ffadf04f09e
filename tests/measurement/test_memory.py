"""Sequential mode holds one model at a time in fact: what measuring frees leaves the process."""

import subprocess
import sys
from pathlib import Path

import pytest

from hemorrhage_hf.measurement.memory import _glibc

# Run in a fresh process: the allocator's state is per process, and this test's must not depend on earlier tests.
SCRIPT = """
import ctypes, os, sys
import torch
sys.path.insert(0, {tests!r})
from conftest import tiny_llama
from hemorrhage_hf.comparison import MeasureOptions, TextSource, compare
from hemorrhage_hf.corpus import python_docs_text
from hemorrhage_hf.models import load_tokenizer

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = MallInfo2

tokenizer = load_tokenizer("default")
os.environ["HEMORRHAGE_HF_CACHE"] = {cache!r}  # the store goes here; the default model's tokenizer came from the user's
# Full-vocabulary logits of a 64-token window are 12 MB: freeing them is what raises glibc's default threshold.
model = tiny_llama(vocab_size=len(tokenizer), hidden=64)
source = TextSource(text=python_docs_text(), window=64, max_tokens=128)

def newly_mapped_by_an_8_mib_block():  # like a few rows of full-vocabulary statistics
    mapped = mallinfo2().hblkhd
    block = torch.ones(2 << 20)
    return mallinfo2().hblkhd - mapped

during = []
model.register_forward_hook(lambda module, args, output: during.append(newly_mapped_by_an_8_mib_block()))
compare(model, modification="int8", tokenizer=tokenizer, source=source,
        options=MeasureOptions(sequential=True, progress=False))
print(during[-1], newly_mapped_by_an_8_mib_block())
"""


@pytest.mark.skipif(_glibc() is None, reason="the allocator's thresholds are glibc's")
def test_a_sequential_compare_maps_its_temporaries_and_leaves_the_heap_to_later_work(tmp_path):
    tests = str(Path(__file__).resolve().parents[1])
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(tests=tests, cache=str(tmp_path))],
        capture_output=True,
        text=True,
        check=True,
    )
    during, after = (int(number) for number in done.stdout.strip().splitlines()[-1].split())
    # Served from the heap instead (glibc's default after a bigger block was freed), the block's pages would stay
    # in the process once freed: over a window, ~300 MB for SmolLM2, about half its weights.
    assert during >= 8 << 20, f"during the compare an 8 MiB block came from the heap ({during} bytes newly mapped)"
    # Mapping every such block costs page faults: work after the compare must not keep paying them.
    assert after == 0, f"after the compare an 8 MiB block was still mapped ({after} bytes)"
