"""Scorers with a known answer for tests, imported as `known_scorers:<name>` (tests/ is on sys.path)."""


def says_thanks(prompt: str, response: str) -> float:
    """1 when the reply thanks the user, else 0: a rule the tiny models can learn in a few steps."""
    return float("thanks" in response.lower())


def shorter(prompt: str, response: str) -> float:
    return -float(len(response.split()))


def thanks_then_short(prompt: str, response: str) -> float:
    """Thanks first (a step of 10), then fewer characters: rarely a tie, even for a tiny model's babble."""
    return 10 * says_thanks(prompt, response) - len(response) / 100


def nan_when_empty(prompt: str, response: str) -> float:
    """A broken scorer: NaN for an empty reply (what a division by its length gives)."""
    return float(len(response)) if response else float("nan")


def asks_for_password(prompt: str, response: str) -> bool:
    """A flagger (simulated annotators' --simulate-unsafe): True for a reply that mentions a password at all."""
    return "password" in response.lower()


def returns_none(prompt: str, response: str) -> None:
    """A broken scorer: forgot its `return` (the bug a user's own scorer shows first)."""
    score = float(len(response))  # noqa: F841


def none_on_an_edit(prompt: str, response: str) -> float | None:
    """A broken scorer that fails only on a probe's edited answer (one ending "Hope this helps!")."""
    return None if response.endswith("Hope this helps!") else float(len(response))


def returns_text(prompt: str, response: str) -> str:
    """A broken scorer: a label, not a number."""
    return "good" if response else "bad"


def returns_list(prompt: str, response: str) -> list[float]:
    """A broken scorer: a score per word, not one number."""
    return [float(len(w)) for w in response.split()]


def parses_the_reply(prompt: str, response: str) -> float:
    """A broken scorer that raises: float() of the reply's text, a ValueError `align label` said as its own."""
    return float(response)
