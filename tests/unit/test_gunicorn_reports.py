"""Worker reports through a real pipe: well-formed ones are read, anything else is refused."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from hotpatch.gunicorn._state import (
    MAX_REPORT_BYTES,
    ReportReader,
    StageReport,
    decode_report,
    open_report_pipe,
    send_report,
)


@pytest.fixture(name="pipe")
def _pipe() -> Iterator[tuple[ReportReader, int]]:
    read_fd, write_fd = open_report_pipe(os.getpid())
    reader = ReportReader(read_fd)
    try:
        yield reader, write_fd
    finally:
        reader.close()
        os.close(write_fd)


def test_reports_round_trip_and_partial_lines_wait(pipe: tuple[ReportReader, int]) -> None:
    reader, fd = pipe
    send_report(fd, StageReport("loaded", release="r1-abc", duration_s=0.25))
    os.write(fd, b'{"v": 1, "stage": "healthy", ')  # half a line: kept for later
    assert reader.read() == [StageReport("loaded", release="r1-abc", duration_s=0.25)]
    os.write(fd, b'"release": "r1-abc"}\n')
    assert reader.read() == [StageReport("healthy", release="r1-abc")]
    assert reader.rejected == []


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"\xff\xfe binary",
        b"[]",
        b'{"v": 2, "stage": "healthy"}',
        b'{"v": 1, "stage": "exploded"}',
        b'{"v": 1, "stage": "failed", "failed_at": "elsewhere"}',
        b'{"v": 1, "stage": "healthy", "reason": 5}',
        b'{"v": 1, "stage": "healthy", "duration_s": "fast"}',
        b'{"v": 1, "stage": "healthy", "duration_s": -1}',
        b'{"v": 1, "stage": "healthy", "extra": 1}',
        b'{"v": 1, "stage": "healthy", "reason": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
    ],
)
def test_malformed_reports_are_refused(pipe: tuple[ReportReader, int], line: bytes) -> None:
    reader, fd = pipe
    with pytest.raises(ValueError, match=r"."):
        decode_report(line)
    os.write(fd, line + b"\n")
    send_report(fd, StageReport("loaded", release="r1"))
    assert reader.read() == [StageReport("loaded", release="r1")]  # the channel goes on
    assert len(reader.rejected) == 1


def test_a_worker_that_floods_its_pipe_is_cut_off(pipe: tuple[ReportReader, int]) -> None:
    reader, fd = pipe
    os.set_blocking(fd, False)
    line = json.dumps({"v": 1, "stage": "loaded", "reason": "x" * 1000}).encode() + b"\n"
    sent = 0
    while sent <= MAX_REPORT_BYTES:
        try:
            sent += os.write(fd, line)
        except BlockingIOError:
            reader.read()  # drain, as the master's loop would
    reader.read()
    assert any("more than" in r for r in reader.rejected)
    assert reader.fd is None
    assert reader.read() == []


def test_long_texts_are_cut_by_the_worker() -> None:
    report = StageReport("failed", failed_at="load", reason="r" * 10_000, error="e" * 100_000)
    decoded = decode_report(send_line(report))
    assert len(decoded.reason) <= 2_000 and len(decoded.error) <= 32_000


def send_line(report: StageReport) -> bytes:
    read_fd, write_fd = os.pipe()
    try:
        send_report(write_fd, report)
        os.close(write_fd)
        chunks = []
        while chunk := os.read(read_fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(read_fd)
