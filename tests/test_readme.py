"""README.md's module map names every module and subpackage at the top of the package."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_module_map_names_every_top_level_module_and_subpackage():
    readme = ROOT.joinpath("README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Module map") :]
    section = section[: section.index("\n## ", 1)]
    named = set(re.findall(r"`([\w/.]+)`", section))
    package = ROOT / "hemorrhage_hf"
    modules = {path.name for path in package.glob("*.py") if path.name != "__init__.py"}
    subpackages = {f"{path.name}/" for path in package.iterdir() if (path / "__init__.py").is_file()}
    assert (modules | subpackages) - named == set()
