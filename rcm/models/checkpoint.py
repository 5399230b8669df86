"""Transitional alias: the old home of weight loading, kept only so importers not yet moved keep working.

Import from ``rcm.models`` instead (``rcm.models.weights`` for the generic loaders,
``rcm.models.wan_layouts`` / ``rcm.models.wan_loading`` for the Wan DiT). Delete this file once
``rcm/*.py``, ``rcm/models/vae.py`` and the tests import from there.
"""
from .wan_layouts import *  # noqa: F401,F403
from .wan_layouts import __all__ as _layouts
from .wan_loading import *  # noqa: F401,F403
from .wan_loading import __all__ as _loading
from .weights import *  # noqa: F401,F403
from .weights import __all__ as _weights

__all__ = [*_weights, *_layouts, *_loading]
