"""Atomic writes leave files with the permissions an ordinary write would."""

import os
import stat

import pytest

from hemorrhage_hf.atomic import atomic_write_text, write_json


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_new_file_gets_the_umask_permissions(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "report.md", "# report\n")
        write_json(tmp_path / "report.json", {"kl_mean": float("inf")})
    finally:
        os.umask(previous)
    for name in ("report.md", "report.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert (tmp_path / "report.json").read_text() == '{\n  "kl_mean": null\n}\n'


def test_a_rewritten_file_keeps_its_own_permissions(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("# my model\n")
    card.chmod(0o640)
    atomic_write_text(card, "# my model\n\nmore\n")
    assert stat.S_IMODE(card.stat().st_mode) == 0o640 and card.read_text().endswith("more\n")
    assert [path.name for path in tmp_path.iterdir()] == ["README.md"]  # no temporary file left
