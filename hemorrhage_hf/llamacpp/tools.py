"""llama.cpp's own programs (converter, quantizer, importance matrix, perplexity), built once from the same source
as the ``llama-cpp-python`` engine.

``hemorrhage-hf install-llama-cpp`` (run by ``make install``) downloads the ``llama-cpp-python`` sdist from the
package registry, builds its wheel with a kept build folder and installs it, then builds ``llama-quantize``,
``llama-imatrix`` and ``llama-perplexity`` in that same folder (only their own sources compile: the libraries are
the wheel's). Everything lives in :func:`tools_dir`; a second run finds it all and builds nothing.

Layout of :func:`tools_dir` (``$HEMORRHAGE_HF_LLAMA_CPP``, else ``<cache_dir()>/llama.cpp``)::

    src/llama_cpp_python-<version>/        the sdist; vendor/llama.cpp holds convert_hf_to_gguf.py
    build/                                 cmake build folder; build/bin holds the programs and libraries
    wheels/llama_cpp_python-<version>-*.whl

Programs are looked up there first, then on ``PATH`` (e.g. a system llama.cpp); a missing one is a clear error
naming the command that provides it.

Example:
    >>> from hemorrhage_hf.llamacpp.tools import tools_dir
    >>> tools_dir().name  # doctest: +SKIP
    'llama.cpp'
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

from ..errors import HemorrhageError
from ..models import cache_dir

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
TOOLS_ENVIRONMENT = "HEMORRHAGE_HF_LLAMA_CPP"
PROGRAMS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
CONVERTER = "convert_hf_to_gguf.py"
#: the wheel needs only the libraries; tools are built afterwards in the same folder
_WHEEL_CMAKE_ARGS = (
    "-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF "
    "-DLLAMA_BUILD_SERVER=OFF"
)


class LlamaCppToolError(HemorrhageError):
    """A llama.cpp program is missing, cannot be built here, or failed."""


def tools_dir() -> Path:
    return Path(os.environ.get(TOOLS_ENVIRONMENT, cache_dir() / "llama.cpp"))


def _source_dir() -> Path:
    return tools_dir() / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"


def find_program(name: str) -> Path:
    """A llama.cpp program (``llama-quantize``…) from :func:`tools_dir`, else ``PATH``."""
    built = tools_dir() / "build" / "bin" / name
    if built.is_file() and os.access(built, os.X_OK):
        return built
    found = shutil.which(name)
    if found:
        return Path(found)
    raise LlamaCppToolError(
        f"llama.cpp's {name} is not built: run `hemorrhage-hf install-llama-cpp` (or `make install`; needs cmake and a "
        f"C++ compiler), or put a llama.cpp build's {name} on PATH"
    )


def find_converter() -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` (from the same sdist, beside its own ``gguf-py``)."""
    script = _source_dir() / "vendor" / "llama.cpp" / CONVERTER
    if script.is_file():
        return script
    found = shutil.which(CONVERTER)
    if found:
        return Path(found)
    raise LlamaCppToolError(
        f"llama.cpp's {CONVERTER} is missing: run `hemorrhage-hf install-llama-cpp` (or `make install`), which "
        f"unpacks it from the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist"
    )


def run_program(command: Sequence[str | Path], *, what: str, timeout: float | None = None) -> str:
    """Run one llama.cpp program; its output on success, a clear error (with its last lines) on failure.

    A program killed by a signal is reported as such: SIGILL in llama.cpp usually means weight repacking on a CPU
    whose instructions the virtual machine does not pass through (``--no-repack`` avoids it).
    """
    command = [str(part) for part in command]
    try:
        finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout, errors="replace")
    except FileNotFoundError as error:
        raise LlamaCppToolError(f"{what}: cannot run {command[0]}: {error}") from error
    except subprocess.TimeoutExpired as error:
        raise LlamaCppToolError(f"{what}: {command[0]} did not finish within {timeout:.0f} s") from error
    output = finished.stdout + finished.stderr
    if finished.returncode == 0:
        return output
    tail = "\n".join(output.strip().splitlines()[-12:])
    if finished.returncode < 0:
        name = signal.Signals(-finished.returncode).name
        hint = " (SIGILL: try HEMORRHAGE_HF_LLAMA_REPACK=0)" if name == "SIGILL" else ""
        raise LlamaCppToolError(f"{what}: {Path(command[0]).name} was killed by {name}{hint}:\n{tail}")
    raise LlamaCppToolError(f"{what}: {Path(command[0]).name} exited with status {finished.returncode}:\n{tail}")


# --- installing -----------------------------------------------------------------------------------------------------


def missing_build_tools() -> list[str]:
    """What the build needs and this machine lacks (cmake, a C and a C++ compiler)."""
    missing = []
    if shutil.which("cmake") is None:
        missing.append("cmake (e.g. `apt-get install cmake` or `pip install cmake`)")
    if not any(shutil.which(name) for name in ("c++", "g++", "clang++")):
        missing.append("a C++ compiler (e.g. `apt-get install g++` or `build-essential`)")
    if not any(shutil.which(name) for name in ("cc", "gcc", "clang")):
        missing.append("a C compiler (e.g. `apt-get install gcc`)")
    return missing


def _pip(*arguments: str, environment: dict | None = None) -> None:
    command = [sys.executable, "-m", "pip", *arguments]
    print("+ " + " ".join(command), flush=True)
    if subprocess.run(command, env=environment).returncode != 0:
        raise LlamaCppToolError(f"`{' '.join(command)}` failed (its output is above)")


def _installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def install(*, jobs: int | None = None) -> Path:
    """Build and install the ``llama-cpp-python`` wheel and llama.cpp's programs into :func:`tools_dir` (once)."""
    root = tools_dir()
    source, build = _source_dir(), root / "build"
    have_programs = all((build / "bin" / name).is_file() for name in PROGRAMS)
    if _installed_version() == LLAMA_CPP_PYTHON_VERSION and have_programs and (source / "vendor").is_dir():
        print(f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} and llama.cpp's programs are ready in {root}")
        return root
    missing = missing_build_tools()
    if missing:
        raise LlamaCppToolError("building llama.cpp needs " + " and ".join(missing))
    jobs = jobs or os.cpu_count() or 2
    if not (source / "vendor").is_dir():
        downloads = root / "downloads"
        _pip(
            "download",
            "--no-binary",
            ":all:",
            "--no-deps",
            "-d",
            str(downloads),
            f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
        )
        archive = next(downloads.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"))
        with tarfile.open(archive) as bundle:
            bundle.extractall(source.parent, filter="data")
    wheels = root / "wheels"
    wheel = next(iter(sorted(wheels.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}-*.whl"))), None)
    if wheel is None:
        environment = {**os.environ, "CMAKE_ARGS": _WHEEL_CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(jobs)}
        _pip("wheel", "--no-deps", "-C", f"build-dir={build}", "-w", str(wheels), str(source), environment=environment)
        wheel = next(iter(sorted(wheels.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}-*.whl"))))
    if _installed_version() != LLAMA_CPP_PYTHON_VERSION:
        _pip("install", str(wheel))
    if not have_programs:
        # Same build folder and flags: the libraries the wheel compiled are reused, only the programs compile.
        run_program(["cmake", "-DLLAMA_BUILD_TOOLS=ON", str(build)], what="configuring llama.cpp's programs")
        run_program(
            ["cmake", "--build", str(build), "--parallel", str(jobs), "--target", *PROGRAMS],
            what="building llama.cpp's programs",
        )
    print(f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} installed; llama.cpp's programs are in {build / 'bin'}")
    return root
