"""AdapterPort: messages from many threads reach the engine thread in order; admin callers wait for their
command to be applied only while an engine thread runs, and never hang when it stops; snapshots are
published whole."""

from __future__ import annotations

import threading

import pytest

from loraplex.adapters.errors import AdapterCommandError, AdapterCommandTimeout
from loraplex.adapters.messages import Forget, HostLoaded, Pin, PutHost, Restore
from loraplex.adapters.peft_config import LoraSpec
from loraplex.adapters.port import AdapterPort
from loraplex.adapters.slot_table import AdapterSnapshot
from loraplex.adapters.weights import AdapterWeights

TIMEOUT = 30.0


def weights(tag: str) -> AdapterWeights:
    return AdapterWeights(LoraSpec(r=1, lora_alpha=1.0, target_modules=(tag,)), {}, size_bytes=64)


def test_messages_from_many_threads_arrive_whole_and_in_each_threads_order():
    port = AdapterPort()
    woken = threading.Semaphore(0)
    port.waker = woken.release

    def poster(t: int) -> None:
        for i in range(200):
            port.post(Forget(f"t{t}-{i}"))

    threads = [threading.Thread(target=poster, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(TIMEOUT)
    assert port.pending() and port.wait_for_message(0)
    names = [m.name for m in port.drain()]
    assert not port.pending() and not port.wait_for_message(0) and port.drain() == []
    assert sorted(names) == sorted(f"t{t}-{i}" for t in range(4) for i in range(200))
    for t in range(4):
        mine = [n for n in names if n.startswith(f"t{t}-")]
        assert mine == [f"t{t}-{i}" for i in range(200)]
    assert woken.acquire(timeout=0)  # every post woke the engine


def test_put_queues_without_waking_and_register_posts_restore_put_host_pin_in_order():
    port = AdapterPort()
    wakes: list[int] = []
    port.waker = lambda: wakes.append(1)
    port.put(HostLoaded("x", 1, weights("x"), 0.0))  # the host loader wakes once itself, after posting
    assert wakes == []
    w = weights("a")
    commands = port.register("a", w, pinned=True)
    assert [type(c) for c in commands] == [Restore, PutHost, Pin] and wakes
    msgs = port.drain()
    assert [type(m) for m in msgs] == [HostLoaded, Restore, PutHost, Pin] and msgs[2].weights is w
    assert [type(c) for c in port.register("b", w, pinned=False)] == [Restore, PutHost]


def test_without_an_engine_thread_admin_calls_do_not_wait():
    port = AdapterPort()
    assert port.wait_applied([port.forget("a")]) is False and port.wait_applied([None]) is False
    assert port.pending()  # applied at the next step of whoever drives the engine


def test_admin_calls_wait_until_the_engine_thread_applied_them_and_published():
    port, stop = AdapterPort(), threading.Event()
    published = AdapterSnapshot(num_slots=3)
    port.engine_running = lambda: not stop.is_set()

    def engine() -> None:
        while not stop.is_set():
            if port.wait_for_message(0.01):
                port.publish(published, port.drain())

    thread = threading.Thread(target=engine)
    thread.start()
    try:
        assert port.wait_applied([port.pin("a"), port.forget("b")]) is True
        assert port.snapshot is published  # the caller sees the snapshot that shows its command
    finally:
        stop.set()
        thread.join(TIMEOUT)


def test_a_waiting_admin_call_fails_when_the_engine_thread_stops():
    port, running = AdapterPort(), threading.Event()
    running.set()
    port.engine_running = running.is_set
    command = port.forget("a")  # nobody drains: the engine is wedged, then dies
    threading.Timer(0.05, running.clear).start()
    with pytest.raises(AdapterCommandTimeout, match=r"stopped before applying Forget\('a'\)"):
        port.wait_applied([command], timeout=TIMEOUT)
    assert not command.applied.is_set()


def test_a_command_not_applied_in_time_is_a_503_naming_it():
    port = AdapterPort()
    port.engine_running = lambda: True  # a wedged engine thread: it never drains
    with pytest.raises(AdapterCommandTimeout, match=r"did not apply Pin\('a'\) within 1 s") as err:
        port.wait_applied([port.pin("a")], timeout=1)
    assert err.value.status == 503


def test_a_command_the_engine_failed_to_apply_is_a_500_naming_it():
    port = AdapterPort()
    port.engine_running = lambda: True
    command = port.forget("a")
    command.fail("KeyError: 'a'")  # what the engine thread records when applying it raised
    port.publish(AdapterSnapshot(num_slots=1), port.drain())
    with pytest.raises(AdapterCommandError, match=r"failed to apply Forget\('a'\): KeyError") as err:
        port.wait_applied([command])
    assert err.value.status == 500


def test_publish_releases_only_commands():
    port = AdapterPort()
    cmd, loaded = Forget("a"), HostLoaded("a", 1, weights("a"), 0.0)
    snap = AdapterSnapshot(num_slots=1)
    port.publish(snap, [loaded, cmd])
    assert port.snapshot is snap and cmd.applied.is_set()
