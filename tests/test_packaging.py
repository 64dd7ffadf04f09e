"""The wheel a user installs holds every subpackage and the model-card templates of model_cards/."""

import subprocess
import sys
import zipfile
from pathlib import Path

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
    names = set(zipfile.ZipFile(wheel).namelist())
    source_modules = {str(path.relative_to(ROOT)) for path in (ROOT / "hemorrhage_hf").rglob("*.py")}
    assert source_modules - names == set()
    templates = {f"hemorrhage_hf/model_cards/{path.name}" for path in (ROOT / "model_cards").glob("*.md")}
    assert len(templates) == 2 and templates <= names
