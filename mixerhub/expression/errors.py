"""How an expression fails: at load time (ExpressionError) or at request time (EvaluationError)."""

from __future__ import annotations


class ExpressionError(ValueError):
    """A syntax or type error found when configuration is loaded.

    ``position`` is the 0-based character offset into ``source`` where the problem is; ``str(e)`` is
    ``"position {position}: {reason}"`` (0-based, so position 0 is the first character).
    """

    def __init__(self, source: str, position: int, reason: str) -> None:
        super().__init__(f"position {position}: {reason}")
        self.source = source
        self.position = position
        self.reason = reason

    def __reduce__(self) -> tuple[type[ExpressionError], tuple[str, int, str]]:
        # Exceptions pickle through their args; this one's constructor takes three.
        return (type(self), (self.source, self.position, self.reason))


class EvaluationError(Exception):
    """An expression could not be evaluated against one attribute bag.

    The usual cause is a missing attribute (``lookup failed: "request.path"``); a ``|`` default
    covers that. Conversions such as ``ip(x)`` on a malformed value fail here too.
    """
