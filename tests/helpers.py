"""Shared test helpers."""


def flat(output: str) -> str:
    """CLI output with Rich's box drawing and line wrapping undone, for substring checks."""
    return " ".join(output.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())
