"""Server-sent events: one event is one line for every client, whatever text the model generates."""

from __future__ import annotations

import json

from loraplex.server.api.generation import sse


def test_an_event_is_one_line_even_with_unicode_line_separators():
    text = "a\x85b\u2028c\u2029d\ne\rf\x0bg\x1ch"
    event = sse({"choices": [{"text": text}]})
    lines = event.splitlines()  # str.splitlines splits on all of the above, as httpx's iter_lines does
    assert lines == [lines[0], ""] and lines[0].startswith("data: ")
    assert json.loads(lines[0].removeprefix("data: "))["choices"][0]["text"] == text
    assert sse("[DONE]") == "data: [DONE]\n\n"
