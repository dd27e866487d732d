"""Fuzz tests of ``--drop``: any text is either a valid layer list or one GhostsolveError (issue 13)."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ghostsolve.cli import parse_layers
from ghostsolve.errors import GhostsolveError
from ghostsolve.workflows import check_request
from tests.model_factories import tiny_model

_PIECES = st.one_of(
    st.integers(-3, 12).map(str),
    st.tuples(st.integers(-3, 12), st.integers(-3, 12)).map(lambda ab: f"{ab[0]}-{ab[1]}"),
    st.sampled_from(["", " ", "-", "--", "1-", "-1", "a", "1.5", "٣", "1e3", "0x1", "+2", "1--2", "9" * 30,
                     "0-99999999999", "3 - 5", "\x00", "1,,2"]),
)  # fmt: skip
SPECS = st.one_of(st.lists(_PIECES, max_size=6).map(",".join), st.text(max_size=30))


@given(spec=SPECS)
@example(spec="0-99999999999")
@example(spec="1-" + "9" * 40)
def test_parse_layers_gives_distinct_indices_or_a_ghostsolve_error(spec: str) -> None:
    try:
        layers = parse_layers(spec)
    except GhostsolveError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert layers and all(isinstance(i, int) and i >= 0 for i in layers)
    assert len(set(layers)) == len(layers)
    assert parse_layers(",".join(map(str, layers))) == layers  # the canonical spelling reads back


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_layers=4)


@given(spec=SPECS)
def test_a_drop_list_is_checked_against_the_model_with_a_ghostsolve_error(model, spec: str) -> None:
    try:
        check_request(model, methods=["ghost"], drop=parse_layers(spec), select=None, num_drop=None,
                      order="independent", out=None, overwrite=False)  # fmt: skip
    except GhostsolveError:
        return
    layers = parse_layers(spec)
    assert max(layers) < 4 and len(layers) < 4
