"""Token estimates: tiktoken's count, remembered for texts that come back."""

from __future__ import annotations

from proxy.tokens import TokenCounter

SYSTEM = "You are a careful assistant who answers in plain English. " * 40
TOOLS = [{"name": "read_file", "description": "Read a file. " * 30, "input_schema": {}}]


def call(*turns: str) -> dict:
    return {
        "system": SYSTEM,
        "tools": TOOLS,
        "messages": [{"role": "user", "content": text} for text in turns],
    }


def test_an_estimate_is_close_to_counting_the_whole_text():
    counter = TokenCounter()
    request = call("hi", "Summarise the following report. " * 50)
    whole = counter.count("\n".join([SYSTEM, "hi", "Summarise the following report. " * 50]))
    estimate = counter.request_input_tokens(request)
    tools_tokens = counter.count(str(TOOLS))
    assert whole < estimate < whole + tools_tokens * 2 + 20


def test_a_text_seen_before_is_not_counted_again():
    counter = TokenCounter()
    first = counter.known_input_tokens(call("hello"), encode_chars_max=None)
    # every text is known now, the short ones too: nothing is left to count
    again = counter.known_input_tokens(call("hello"), encode_chars_max=0)
    assert again == first
    # a new short turn is all that is counted anew
    assert counter.known_input_tokens(call("hello", "thanks"), encode_chars_max=6) is not None


def test_too_much_new_text_is_left_to_the_caller():
    counter = TokenCounter()
    request = call("x " * 5_000)
    assert counter.known_input_tokens(request, encode_chars_max=1_000) is None
    counted = counter.request_input_tokens(request)
    assert counter.known_input_tokens(request, encode_chars_max=1_000) == counted


def test_a_changed_text_is_counted_anew():
    counter = TokenCounter()
    short = counter.request_input_tokens(call("word " * 100))
    longer = counter.request_input_tokens(call("word " * 200))
    assert longer - short > 90
