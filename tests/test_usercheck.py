"""A job's own checks (``verify.checks``): every driver reports what a check answered; the core alone judges it."""

from __future__ import annotations

import pytest

from backupd.usercheck import NO_ROW, SHOWN, Answer, judge


@pytest.mark.parametrize("value", [1, True, "t", "0", "yes", 2.5, [0], b"1", b"OK"])
def test_a_true_answer_passes(value: object) -> None:
    check = judge(Answer("check", value))
    assert (check.name, check.ok, check.detail) == ("check", True, "")


@pytest.mark.parametrize(("value", "detail"), [
    (NO_ROW, "returned no row"), (None, "returned None"), (0, "returned 0"), (False, "returned False"),
    ("", "returned "), ([], "returned []"), (b"0", "returned b'0'"), (b"", "returned b''"), (0.0, "returned 0.0"),
])
def test_a_false_answer_fails_showing_it(value: object, detail: str) -> None:
    check = judge(Answer("check", value))
    assert (check.ok, check.detail) == (False, detail)


def test_the_driver_may_show_its_answer_its_own_way_and_long_answers_are_cut() -> None:
    assert judge(Answer("GET k", None, shown="nil")).detail == "returned nil"
    assert judge(Answer("q", "")).ok is False
    long = judge(Answer("q", 0, shown="x" * (SHOWN + 50))).detail
    assert long == "returned " + "x" * SHOWN + "..."


def test_a_check_that_could_not_run_fails_with_its_error() -> None:
    check = judge(Answer("SELECT nope", error="error: no such column: nope"))
    assert (check.ok, check.detail) == (False, "error: no such column: nope")
