"""The hemorrhage map: how much of a modification's KL each decoder layer (or part, or Linear layer of one) is
responsible for.

Two measurements per unit, each against the reference:

- ``isolated``: KL when only this unit is modified (everything else is the reference);
- ``restored``: KL when only this unit is the reference's (everything else modified). ``full − restored`` is what
  restoring it alone recovers.

Were damage additive, both would name the same amount. They differ where units interact, so a unit's
*contribution* is their mean, and its *share* is its contribution over the sum of all layers' contributions. The
sums themselves are reported (``isolated_sum`` against ``full``) so the size of the interactions is visible.

Example:
    >>> from hemorrhage_hf.locate.hmap import HemorrhageMap, UnitFigures
    >>> from hemorrhage_hf.locate.stack import Unit
    >>> hmap = HemorrhageMap(full_kl=1.0, full_kl_error=0.1, n_tokens=100, units=[
    ...     UnitFigures(Unit(0), 0.7, 0.05, 0.35, 0.04), UnitFigures(Unit(1), 0.2, 0.02, 0.75, 0.08)])
    >>> [(unit.name, round(share, 3)) for unit, share in hmap.ranked()]
    [('layers.0', 0.75), ('layers.1', 0.25)]
    >>> round(hmap.concentration(1), 3)
    0.75
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_write_text, read_json
from ..errors import HemorrhageError
from .stack import Unit


@dataclass(frozen=True)
class UnitFigures:
    """Mean KL (and its standard error) with only ``unit`` modified, and with only ``unit`` restored."""

    unit: Unit
    isolated_kl: float
    isolated_error: float
    restored_kl: float
    restored_error: float


@dataclass
class HemorrhageMap:
    full_kl: float
    full_kl_error: float
    n_tokens: int
    units: list[UnitFigures]
    metadata: dict = field(default_factory=dict)

    def figures(self, unit: Unit) -> UnitFigures:
        for figures in self.units:
            if figures.unit == unit:
                return figures
        raise HemorrhageError(f"the map has no figures for {unit.name}")

    def contribution(self, unit: Unit) -> float:
        """Mean of the KL the unit causes alone and the KL restoring it alone recovers (never below 0)."""
        figures = self.figures(unit)
        return max(0.0, (figures.isolated_kl + self.full_kl - figures.restored_kl) / 2)

    def layer_units(self) -> list[Unit]:
        return [figures.unit for figures in self.units if figures.unit.part is None]

    def part_units(self) -> list[Unit]:
        """The attention and MLP units (empty unless measured with ``parts``)."""
        return [figures.unit for figures in self.units if figures.unit.part is not None and not figures.unit.is_linear]

    def linear_units(self) -> list[Unit]:
        """The single-Linear units (empty unless measured with ``linears``)."""
        return [figures.unit for figures in self.units if figures.unit.is_linear]

    @property
    def n_layers(self) -> int:
        return len(self.layer_units())

    def shares(self, units: list[Unit] | None = None) -> dict[Unit, float]:
        """Each unit's contribution over the sum of all of them (``units``: the whole layers by default)."""
        units = self.layer_units() if units is None else units
        contributions = {unit: self.contribution(unit) for unit in units}
        total = math.fsum(contributions.values())
        return {unit: value / total if total > 0 else 0.0 for unit, value in contributions.items()}

    def ranked(self, units: list[Unit] | None = None) -> list[tuple[Unit, float]]:
        """(unit, share), largest share first."""
        return sorted(self.shares(units).items(), key=lambda item: (-item[1], item[0]))

    def concentration(self, top: int) -> float:
        """The share of the ``top`` layers with the largest shares."""
        return math.fsum(share for _, share in self.ranked()[:top])

    def to_dict(self) -> dict:
        layers = self.layer_units()
        shares = self.shares(layers)
        return {
            "full_kl": self.full_kl,
            "full_kl_error": self.full_kl_error,
            "n_tokens": self.n_tokens,
            "isolated_sum": math.fsum(self.figures(unit).isolated_kl for unit in layers),
            "top3_share": self.concentration(3),
            "ranking": [unit.name for unit, _ in self.ranked()],
            "units": [
                {
                    "unit": figures.unit.name,
                    "layer": figures.unit.layer,
                    "part": figures.unit.part,
                    "isolated_kl": figures.isolated_kl,
                    "isolated_error": figures.isolated_error,
                    "restored_kl": figures.restored_kl,
                    "restored_error": figures.restored_error,
                    "contribution": self.contribution(figures.unit),
                    "share": shares.get(figures.unit),
                }
                for figures in self.units
            ],
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: dict) -> HemorrhageMap:
        try:
            units = [
                UnitFigures(
                    Unit(entry["layer"], entry["part"]),
                    entry["isolated_kl"],
                    entry["isolated_error"],
                    entry["restored_kl"],
                    entry["restored_error"],
                )
                for entry in data["units"]
            ]
            return cls(data["full_kl"], data["full_kl_error"], data["n_tokens"], units, data.get("metadata", {}))
        except (KeyError, TypeError) as error:
            raise HemorrhageError(f"not a hemorrhage map (locate.json): missing or malformed {error}") from None

    @classmethod
    def load(cls, path: str | Path) -> HemorrhageMap:
        path = Path(path)
        if path.is_dir():
            path = path / "locate.json"
        return cls.from_dict(read_json(path, missing=f"no hemorrhage map at {path}: run `hemorrhage-hf locate` first"))

    def save(self, output_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
        from ..render import hemorrhage_map_markdown, plot_hemorrhage_map

        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        written = {"json": output_dir / "locate.json", "markdown": output_dir / "locate.md"}
        atomic_write_text(written["json"], json.dumps(self.to_dict(), indent=2) + "\n")
        if plots:
            written["plot"] = output_dir / "locate.png"
            plot_hemorrhage_map(self, written["plot"])
        atomic_write_text(written["markdown"], hemorrhage_map_markdown(self, written.get("plot")))
        return written
