"""The garbage collector's settings for a serving process (`timerd.garbage`)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from timerd import garbage


@pytest.fixture
def restored() -> Iterator[None]:
    yield
    garbage.defaults()


@pytest.mark.usefixtures("restored")
def test_serving_freezes_what_exists_and_collects_the_young_generation_less_often() -> None:
    before = gc.get_threshold()
    garbage.serving()
    assert gc.get_freeze_count() > 0  # the modules and objects of the set-up
    assert gc.get_threshold() == (garbage.YOUNG_THRESHOLD, before[1], before[2])


@pytest.mark.usefixtures("restored")
def test_cyclic_garbage_made_while_serving_is_still_collected() -> None:
    garbage.serving()

    class Node:
        other: object

    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: reference counting alone never frees it
    del a, b
    assert gc.collect() >= 2


def test_defaults_undo_serving() -> None:
    before = gc.get_threshold()
    garbage.serving()
    garbage.defaults()
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before
