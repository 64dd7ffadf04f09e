"""The wheel a user installs holds every subpackage and the model-card templates of model_cards/."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import hemorrhage_hf

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_every_subpackage_and_the_card_templates(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("hemorrhage_hf-*.whl")
    assert wheel.name.startswith(f"hemorrhage_hf-{hemorrhage_hf.__version__}-")  # one version, the one --version says
    names = set(zipfile.ZipFile(wheel).namelist())
    source_modules = {str(path.relative_to(ROOT)) for path in (ROOT / "hemorrhage_hf").rglob("*.py")}
    assert source_modules - names == set()
    templates = {f"hemorrhage_hf/model_cards/{path.name}" for path in (ROOT / "model_cards").glob("*.md")}
    assert len(templates) == 2 and templates <= names


def test_make_test_fails_rather_than_skips_without_the_shared_data(tmp_path):
    """`make test` (the repository's own CI and development) requires ../shared/data; a wheel's user only skips."""
    environment = {key: value for key, value in os.environ.items() if key != "HEMORRHAGE_REQUIRE_SHARED_DATA"}
    environment["HEMORRHAGE_SHARED_DATA"] = str(tmp_path / "missing")
    needs_data = "tests/test_robustness.py::test_same_command_twice_gives_byte_identical_report"
    pytest_args = f"PYTEST_ARGS={needs_data} -p no:cacheprovider -q"
    # -o install: run the test recipe without reinstalling.
    make = subprocess.run(
        ["make", "-o", "install", "test", f"PYTHON={sys.executable}", pytest_args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert make.returncode != 0 and "shared evaluation data not found" in make.stdout
    plain = subprocess.run(
        [sys.executable, "-m", "pytest", needs_data, "-p", "no:cacheprovider", "-q", "-rs"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plain.returncode == 0 and "1 skipped" in plain.stdout
