"""Example counts of the property tests (hypothesis).

The full suite (``task test``) runs each property test with its own count; the fast layer
(``task test:fast``, ``--hypothesis-profile=fast``) runs a sixth of it (at least 25): every
property is still checked there, on fewer examples. Generation stays deterministic
(``derandomize=True`` in the tests), so both layers are reproducible.
"""

from __future__ import annotations

from hypothesis import settings

FAST_PROFILE = "fast"
settings.register_profile(FAST_PROFILE)  # loaded by --hypothesis-profile=fast; see examples()


def examples(thorough: int) -> int:
    """``thorough`` examples, or a sixth of them (at least 25) under the fast profile."""
    if settings.get_current_profile_name() == FAST_PROFILE:
        return max(thorough // 6, 25)
    return thorough
