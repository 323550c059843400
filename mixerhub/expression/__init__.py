"""Mixer's expression language (CEXL), compiled to Python callables.

An expression such as ``destination.service.host == "ratings.default.svc.cluster.local"`` or
``request.headers["user-agent"] | "unknown"`` is parsed (parse.py, grammar.lark), type-checked
against the attribute manifest (check.py), constant-folded (fold.py) and turned into one Python
function (compile.py). The functions it can call are in functions.py and conversions.py.

The language is Istio 1.4's: Go expression syntax; ``|`` picks the first operand that is present;
a missing map key reads as ""; a missing attribute fails evaluation unless a ``|`` covers it.
"""

from mixerhub.expression.compile import Expression, compile_expression
from mixerhub.expression.errors import EvaluationError, ExpressionError

__all__ = ["EvaluationError", "Expression", "ExpressionError", "compile_expression"]
