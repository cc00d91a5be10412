"""Bad command-line values fail at once with one line naming the argument, exit code 2."""

from __future__ import annotations

import argparse

import pytest

from hotpatch.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--clients", "0"], "argument --clients: must be at least 1, not 0"),
        (["demo", "--clients", "-3"], "argument --clients: must be at least 1, not -3"),
        (["demo", "--clients", "many"], "argument --clients: not a whole number: 'many'"),
    ],
)
def test_a_bad_value_is_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_the_argument_types_accept_good_values() -> None:
    from hotpatch.cli._args import pid, positive_int, seconds

    assert positive_int("4") == 4
    assert pid("4242") == 4242
    assert seconds("0.5") == 0.5
    for bad in ("0", "-1", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"not|must"):
            seconds(bad)
    for bad in ("0", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be a positive process id"):
            pid(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="not a process id"):
        pid("x")
