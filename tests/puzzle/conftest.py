"""Fixtures shared by the Puzzle tests: a tiny parent, its block library and BLD blocks (built once)."""

from __future__ import annotations

import pytest

from llmcompress.puzzle import LibraryConfig, build_library, run_bld
from puzzle_helpers import BLD, one_thread, tiny_parent, tiny_tokens


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def parent():
    return tiny_parent()


@pytest.fixture(scope="session")
def library(parent):
    with one_thread():
        return build_library(parent, tiny_tokens(4), LibraryConfig(ffn_fractions=[0.5, 0.25]))


@pytest.fixture(scope="session")
def bld_dir(parent, library, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bld")
    with one_thread():
        run_bld(parent, library, tiny_tokens(8, seed=1), BLD, folder)
    return folder
