"""Attention: the one op with a custom differentiation rule. See ops.py for the contract."""

import torch

from .ops import BACKENDS, ROUTES, attention, resolve_backend, select_route, set_backend

if torch.distributed.is_available():
    from . import sharding  # noqa: F401  (registers DTensor sharding rules)

__all__ = ["BACKENDS", "ROUTES", "attention", "resolve_backend", "select_route", "set_backend"]
