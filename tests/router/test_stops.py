"""Stop strings on streamed text: hold-back, matches across deltas, inclusion, min_tokens."""

from __future__ import annotations

from router.stops import StopStringMatcher


def feed(matcher: StopStringMatcher, deltas: list[str]) -> list[str]:
    out = [matcher.push(d) for d in deltas]
    if matcher.matched is None:
        out.append(matcher.flush())
    return out


def test_match_across_deltas_never_leaks_text_past_the_stop() -> None:
    m = StopStringMatcher(["STOP"], include_stop_str_in_output=False)
    out = feed(m, ["Hello S", "T", "OP and more"])
    assert "".join(out) == "Hello "
    assert out[0] == "Hello "  # "S" is held back: it may start "STOP"
    assert m.matched == "STOP"
    assert m.push("later") == ""


def test_held_back_text_is_released_when_ruled_out() -> None:
    m = StopStringMatcher(["STOP"], include_stop_str_in_output=False)
    assert m.push("ST") == ""
    assert m.push("ART") == "START"
    assert m.flush() == ""
    m2 = StopStringMatcher(["STOP"], include_stop_str_in_output=False)
    assert m2.push("end ST") == "end "
    assert m2.flush() == "ST"


def test_include_stop_string() -> None:
    m = StopStringMatcher(["fox", "dog"], include_stop_str_in_output=True)
    assert "".join(feed(m, ["the quick f", "ox jumps"])) == "the quick fox"
    assert m.matched == "fox"


def test_earliest_of_several_stops_wins() -> None:
    m = StopStringMatcher(["world", "lo w"], include_stop_str_in_output=False)
    assert "".join(feed(m, ["hello world"])) == "hel"
    assert m.matched == "lo w"


def test_inactive_text_never_matches_later() -> None:
    m = StopStringMatcher(["ab"], include_stop_str_in_output=False)
    assert m.push("xab", active=False) == "xab"
    assert m.matched is None
    assert m.push("c") == "c"
    assert m.push("a") == ""
    assert m.push("b!") == ""
    assert m.matched == "ab"
    assert m.text == "xabc"


def test_no_stops_streams_everything() -> None:
    m = StopStringMatcher([], include_stop_str_in_output=False)
    assert feed(m, ["a", "b"]) == ["a", "b", ""]
