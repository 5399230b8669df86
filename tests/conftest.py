"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A tiny random digits teacher (not the shipped one): distillation tests in seconds."""
    from rcm.digits.model import build_model, save_model

    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    model = build_model("digits-dit-tiny")
    torch.nn.init.normal_(model.dit.head.head.weight, std=0.05, generator=torch.Generator().manual_seed(3))
    save_model(model, path, {"kind": "teacher"})
    return path
