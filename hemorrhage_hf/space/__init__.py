"""The hemorrhage Space: a Gradio app to watch a model bleed (``hemorrhage-hf space`` or spaces/hemorrhage/app.py).

Gradio is imported on the first call of :func:`build_demo` or :func:`launch`, not with this package.

Example:
    >>> from hemorrhage_hf.space import build_demo, launch
    >>> launch(build_demo(), port=7860)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import gradio

    from .backend import ModelCache


def build_demo(cache: ModelCache | None = None) -> gradio.Blocks:
    """The Space's Blocks; see :func:`hemorrhage_hf.space.ui.build_demo`."""
    from .ui import build_demo as build

    return build(cache)


def launch(demo: gradio.Blocks, **arguments):
    """Serve ``demo`` on 127.0.0.1 by default; see :func:`hemorrhage_hf.space.ui.launch`."""
    from .ui import launch as serve

    return serve(demo, **arguments)
