"""hotpatch.listen's own checks, and its request handling without a second process."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from hotpatch import ConfigError, Engine, listen
from hotpatch.control import control_dir, send_request


def test_listen_needs_modules_and_the_main_thread() -> None:
    with pytest.raises(ConfigError, match="module names"):
        listen([])
    errors: list[BaseException] = []

    def in_a_thread() -> None:
        try:
            listen(["os"])
        except ConfigError as exc:
            errors.append(exc)

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join(10)
    assert errors and "main thread" in str(errors[0])


def test_requests_are_handled_and_the_listener_cleans_up(make_module) -> None:
    mod = make_module("def f():\n    return 1\n")
    listener = listen([mod.__name__], engine=Engine())
    try:
        assert listener.listened() == [mod.__name__]
        assert oct(control_dir(os.getpid()).stat().st_mode & 0o777) == "0o700"
        Path(mod.__file__).write_text("def f():\n    return 2\n")
        result = send_request(os.getpid(), "patch", timeout_s=30)
        assert result["outcome"] == "applied" and mod.f() == 2
        assert result["results"][0]["changed"] == ["f"]
        result = send_request(os.getpid(), "rollback", module=mod.__name__, timeout_s=30)
        assert result["outcome"] == "rolled_back" and mod.f() == 1
        result = send_request(os.getpid(), "rollback", module=mod.__name__, timeout_s=30)
        assert result["outcome"] == "error" and "no earlier version" in result["message"]
    finally:
        listener.close()
    assert not control_dir(os.getpid()).exists()
