"""Hypothesis strategies shared by the property tests: small channels and patterns.

Three tokens are enough to make overlaps, nesting and near misses common.
"""

from __future__ import annotations

from hypothesis import strategies as st

TOKENS = st.sampled_from(["a", "b", "c"])
CHANNELS = st.lists(TOKENS, min_size=1, max_size=4).map(".".join)
# Tokens and stars, the last one possibly replaced by '>' (so '>' alone too).
PATTERNS = st.builds(
    lambda tokens, tail: ".".join([*tokens[:-1], ">"] if tail else tokens),
    st.lists(st.one_of(TOKENS, st.just("*")), min_size=1, max_size=5),
    st.booleans(),
)
