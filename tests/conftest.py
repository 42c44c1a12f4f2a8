"""Shared fixtures: tiny real pipelines built in-process (seeded, offline)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory):
    """A tiny SD1 pipeline written by diffusers itself (`save_pretrained`)."""
    from booth.models.tiny import tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-sd1")
    tiny_pipeline("sd1").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sd1_engine(tiny_sd1_dir):
    from booth.generate.engine import Engine

    return Engine.from_model(str(tiny_sd1_dir))
