"""The allocator setting the CLI makes: it takes effect in a fresh process, and a user's own choice wins."""

import os
import subprocess
import sys

import pytest

CHECK = (
    "from hemorrhage_hf.allocator import release_freed_memory_promptly as release; "
    "print(release())"
)


def _run(env_extra: dict) -> str:
    env = {key: value for key, value in os.environ.items() if key != "MALLOC_MMAP_THRESHOLD_"} | env_extra
    return subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")
def test_threshold_is_fixed_unless_the_user_set_one():
    assert _run({}) == "True"
    assert _run({"MALLOC_MMAP_THRESHOLD_": "65536"}) == "False"
