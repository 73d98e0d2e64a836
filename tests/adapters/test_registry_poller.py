"""RegistryPoller: counts polls by result, keeps serving through failures (logged once per distinct error),
and applies changes from its own thread until stopped."""

from __future__ import annotations

import logging
import threading

import pytest

from loraplex.adapters.registry_poller import RegistryPoller


def test_poll_results_are_counted_and_a_repeated_failure_is_logged_once(caplog):
    answers: list[object] = [[], ["a"], OSError("store down"), OSError("store down"), ValueError("corrupt"), []]

    def sync() -> list[str]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    poller = RegistryPoller(sync, interval_s=5)
    with caplog.at_level(logging.INFO, logger="loraplex.adapters.registry_poller"):
        for _ in range(6):
            poller.poll_once()
    assert poller.polls == {"unchanged": 2, "changed": 1, "error": 3}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "OSError: store down" in warnings[0] and "ValueError: corrupt" in warnings[1]
    assert poller.last_error is None and "registry poll works again" in caplog.text


def test_the_thread_polls_until_stopped():
    polled = threading.Event()

    def sync() -> list[str]:
        polled.set()
        return []

    poller = RegistryPoller(sync, interval_s=0.01)
    poller.start()
    try:
        assert polled.wait(60)
    finally:
        poller.stop()
    assert not poller._thread.is_alive()


def test_the_interval_must_be_positive():
    with pytest.raises(ValueError, match="--registry-poll-seconds: must be > 0"):
        RegistryPoller(lambda: [], 0)
