"""The JSON-prefix scanner agrees with json.loads: valid objects pass char by char and end done; others fail."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from qwen15.serve.json_mode import JSONScanner

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=6), json_values, max_size=5), st.sampled_from([None, 2]),
       st.booleans())
def test_every_prefix_of_a_valid_object_is_accepted(obj, indent, ascii_only):
    text = json.dumps(obj, indent=indent, ensure_ascii=ascii_only)
    scanner = JSONScanner()
    for i, ch in enumerate(text):
        assert scanner.feed(ch), f"rejected {text[:i + 1]!r}"
        assert scanner.done == (i == len(text) - 1), text[:i + 1]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='{}[]":,0123456789-+.eEtruefalsn \\abu', max_size=24))
def test_scanner_never_accepts_what_json_rejects(text):
    scanner = JSONScanner()
    accepted = scanner.feed(text)
    if accepted and scanner.done:
        assert isinstance(json.loads(text), dict)
    if not accepted:  # then no continuation makes it valid: json.loads rejects every completion we can try
        for tail in ("", "}", '"}', "]}", '"]}', "0}", "}]}"):
            try:
                value = json.loads(text + tail)
            except json.JSONDecodeError:
                continue
            assert not isinstance(value, dict) or text[:1] in " \t\r\n", (text, tail)
