"""``hotpatch._log``: structlog's API, the application's sink, decided at each event.

These run the real stdlib ``logging`` and real structlog in this process, with a handler of the
test's own on a test logger (restored afterwards); the subprocess apps of
``tests/integration/test_logging.py`` cover whole programs and gunicorn.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator

import pytest
import structlog
from structlog.testing import capture_logs

from hotpatch._log import get_logger

NAME = "hotpatch.tests_log_probe"


class Captured:
    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.records: list[logging.LogRecord] = []

    @property
    def text(self) -> str:
        return self.stream.getvalue()


@pytest.fixture(name="captured")
def _captured() -> Iterator[Captured]:
    """A handler of our own on the ``hotpatch`` logger, at INFO; everything restored after."""
    captured = Captured()
    handler = logging.StreamHandler(captured.stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(filename)s:%(funcName)s %(message)s"))
    keep = logging.Handler()
    keep.emit = captured.records.append  # type: ignore[method-assign]
    logger = logging.getLogger("hotpatch")
    saved = (logger.level, logger.propagate)
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    logger.addHandler(keep)
    try:
        yield captured
    finally:
        logger.removeHandler(handler)
        logger.removeHandler(keep)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def test_events_are_stdlib_records_of_the_module_logger(captured: Captured) -> None:
    log = get_logger(NAME)

    def replace_worker() -> None:
        log.bind(rollout_id="r1").info("worker.replaced", new_pid=42, file="a b.py")
        log.debug("worker.spawn_requested")  # below the level: dropped

    replace_worker()
    assert captured.text == (
        "INFO test_log.py:replace_worker worker.replaced rollout_id=r1 new_pid=42 file='a b.py'\n"
    )
    (record,) = captured.records
    assert record.name == NAME
    assert record.hotpatch_event == "worker.replaced"  # type: ignore[attr-defined]
    assert record.hotpatch_fields == {"rollout_id": "r1", "new_pid": 42, "file": "a b.py"}  # type: ignore[attr-defined]


def test_tracebacks_render_as_tracebacks(captured: Captured) -> None:
    log = get_logger(NAME)
    try:
        {}["missing"]
    except KeyError:
        log.exception("watch.callback_failed", kind="applied")
    try:
        raise ValueError("bad value")
    except ValueError as exc:
        caught = exc
    log.warning("patch.rejected", exc_info=caught)
    text = captured.text
    assert text.startswith("ERROR test_log.py:test_tracebacks_render_as_tracebacks watch.callback")
    assert text.count("Traceback (most recent call last):") == 2, text
    assert "KeyError: 'missing'" in text and "ValueError: bad value" in text


def test_hostile_values_are_escaped_not_raised(captured: Captured) -> None:
    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    log = get_logger(NAME)
    log.info("watch.file_ignored", file="caf\udce9\n.py", obj=Broken(), empty="")
    assert captured.text.rstrip("\n") == (
        "INFO test_log.py:test_hostile_values_are_escaped_not_raised watch.file_ignored "
        "file='caf\\udce9\\n.py' obj=<unrepresentable Broken> empty=''"
    )
    captured.text.encode("utf-8")  # nothing unencodable reaches a handler


def test_a_configured_structlog_gets_the_events_instead(captured: Captured) -> None:
    log = get_logger(NAME).bind(master_pid=7)
    with capture_logs() as logs:
        log.info("rollout.started", workers=2)
    assert logs == [
        {"event": "rollout.started", "master_pid": 7, "workers": 2, "log_level": "info"}
    ]
    assert captured.records == []
    structlog.reset_defaults()  # unconfigured again: decided at the next event, back to stdlib
    log.info("rollout.completed")
    assert [r.hotpatch_event for r in captured.records] == ["rollout.completed"]  # type: ignore[attr-defined]


def test_a_failing_structlog_pipeline_falls_back_to_stdlib(captured: Captured) -> None:
    def broken(_logger: object, _method: str, _event: object) -> object:
        raise RuntimeError("the app's processor is broken")

    structlog.configure(processors=[broken])
    get_logger(NAME).error("rollout.failed", reason="x")
    assert [r.hotpatch_event for r in captured.records] == ["rollout.failed"]  # type: ignore[attr-defined]


def test_nothing_is_configured_globally() -> None:
    root = logging.getLogger()
    before = (list(root.handlers), root.level, structlog.is_configured())
    log = get_logger(NAME)
    log.warning("watch.stop_timed_out", threads=["t"])
    log.info("watch.stopped")
    assert (list(root.handlers), root.level, structlog.is_configured()) == before
    assert logging.getLogger("hotpatch").handlers == []


def test_under_gunicorn_events_follow_its_error_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process whose ``gunicorn.error`` is set up (as gunicorn's Logger does) routes there."""
    monkeypatch.setitem(
        sys.modules, "gunicorn", sys.modules.get("gunicorn") or type(sys)("gunicorn")
    )
    error_log = logging.getLogger("gunicorn.error")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(name)s %(message)s"))
    saved = (error_log.level, error_log.propagate)
    error_log.addHandler(handler)
    error_log.propagate = False
    log = get_logger(NAME)
    try:
        error_log.setLevel(logging.WARNING)
        log.info("rollout.started")
        assert stream.getvalue() == ""
        error_log.setLevel(logging.INFO)
        log.info("rollout.started", rollout_id=1)
        assert stream.getvalue() == f"[INFO] {NAME} rollout.started rollout_id=1\n"
        # An application that configured the hotpatch logger itself keeps it.
        own = logging.getLogger("hotpatch")
        own.setLevel(logging.ERROR)
        try:
            log.warning("rollout.refused")
        finally:
            own.setLevel(logging.NOTSET)
        assert "rollout.refused" not in stream.getvalue()
    finally:
        error_log.removeHandler(handler)
        error_log.setLevel(saved[0])
        error_log.propagate = saved[1]
