"""Where a modification's damage comes from (the hemorrhage map), and the mixed-precision allocation it points to."""

from .hmap import HemorrhageMap, UnitFigures
from .runner import locate, units_of
from .stack import Unit

__all__ = ["HemorrhageMap", "Unit", "UnitFigures", "locate", "units_of"]
