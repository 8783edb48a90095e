"""Commands a message suggests, written so that they can be copied back into a shell as they are."""
from __future__ import annotations

from shlex import quote


def command(*words: str) -> str:
    """``words`` (a command's words, each as the user would type it unquoted) as one command in the quotes a message
    sets it in: single quotes, or double quotes where a word needs quotes of its own (a study name with a space)."""
    text = " ".join(quote(w) if w else "''" for w in words)
    return f'"{text}"' if "'" in text else f"'{text}'"
