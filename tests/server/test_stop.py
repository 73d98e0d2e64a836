"""StopStringMatcher: stop strings that arrive in pieces, held-back prefixes, earliest match, flush."""

from __future__ import annotations

import random

import pytest

from loraplex.server.engine.stop import StopStringMatcher


def _feed_all(matcher: StopStringMatcher, deltas: list[str]) -> tuple[list[str], bool]:
    out: list[str] = []
    for d in deltas:
        text, stopped = matcher.feed(d)
        out.append(text)
        if stopped:
            return out, True
    out.append(matcher.flush())
    return out, False


def test_stop_string_spanning_deltas_is_excluded():
    m = StopStringMatcher(["END"])
    assert m.feed("hello ") == ("hello ", False)
    assert m.feed("E") == ("", False)  # might be the start of END: held
    assert m.feed("N") == ("", False)
    assert m.feed("D and more") == ("", True)
    assert m.stopped
    assert m.feed("later") == ("", True)  # nothing after a stop is ever emitted
    assert m.flush() == ""


def test_held_prefix_is_released_when_it_diverges_or_at_flush():
    m = StopStringMatcher(["END"])
    assert m.feed("xE") == ("x", False)
    assert m.feed("Nx") == ("ENx", False)  # "EN" then "x": not END after all
    assert m.feed("EN") == ("", False)
    assert m.flush() == "EN"  # generation ended without the stop string
    assert not m.stopped


def test_stop_at_first_character():
    m = StopStringMatcher(["###"])
    assert m.feed("###rest") == ("", True)
    m = StopStringMatcher(["\n"])
    assert m.feed("\n") == ("", True)


def test_text_before_stop_in_the_same_delta_is_emitted():
    m = StopStringMatcher(["</s>"])
    assert m.feed("answer: 42</s>junk") == ("answer: 42", True)


def test_earliest_of_several_stops_wins():
    m = StopStringMatcher(["world", "lo w", "xyz"])
    assert m.feed("hel") == ("he", False)  # "l" could start "lo w"
    assert m.feed("lo world") == ("l", True)  # "hel" in all: "lo w" completes before "world"
    m = StopStringMatcher(["bc", "abcd"])
    assert m.feed("a") == ("", False)  # could become "abcd"
    assert m.feed("bc") == ("a", True)  # "bc" completes first


def test_earliest_completion_wins_within_one_delta():
    # "ab" completes before "cab!" would: same answer as if the text came one character at a time.
    assert StopStringMatcher(["cab!", "ab"]).feed("xcab!") == ("xc", True)
    # Both complete at the same character: the one starting first wins.
    assert StopStringMatcher(["ab", "cab"]).feed("xcab") == ("x", True)


def test_longest_possible_prefix_is_held_across_stops():
    m = StopStringMatcher(["abcX", "bcY"])
    assert m.feed("zabc") == ("z", False)  # "abc" could still be "abcX"
    assert m.feed("Y") == ("a", True)  # it became "bcY" instead: "a" was real text


def test_no_stops_passes_everything_through():
    m = StopStringMatcher([])
    assert m.feed("anything") == ("anything", False)
    assert m.flush() == ""


def test_empty_stop_string_is_refused():
    with pytest.raises(ValueError, match="stop"):
        StopStringMatcher(["ok", ""])


@pytest.mark.parametrize("seed", range(5))
def test_random_splits_match_a_whole_text_reference(seed):
    """Property: however the text is split into deltas, the emitted text equals the whole text cut
    before the stop occurrence that completes first (or all of it when none occurs)."""
    rng = random.Random(seed)
    stops = ["ab", "bba", "cab!", "!!"]
    for _ in range(300):
        text = "".join(rng.choice("abc! ") for _ in range(rng.randint(0, 20)))
        deltas = _random_split(rng, text)
        out, stopped = _feed_all(StopStringMatcher(stops), deltas)
        cut = _reference_cut(text, stops)
        assert stopped == (cut is not None)
        assert "".join(out) == (text if cut is None else text[:cut])


def _reference_cut(text: str, stops: list[str]) -> int | None:
    """Brute force: scan end positions left to right; at the first one where a stop ends, cut before the
    longest stop ending there."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if text[:end].endswith(s)]
        if starts:
            return min(starts)
    return None


def _random_split(rng: random.Random, text: str) -> list[str]:
    pieces, pos = [], 0
    while pos < len(text):
        size = rng.randint(0, 4)
        pieces.append(text[pos : pos + size])
        pos += size
    return pieces
