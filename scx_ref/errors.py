"""The single exception family of scx_ref, and its warnings.

Every error the library raises on bad input is an :class:`SCXError`, so callers can catch one type.
Subclasses say which kind of input was wrong. Every warning it issues about an accepted input is an
:class:`SCXWarning` (a UserWarning), so callers can filter one category.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DTypeError",
    "IntegrityError",
    "KeyScheduleError",
    "LimitError",
    "NonFiniteError",
    "PermutationError",
    "PrecisionWarning",
    "ProtocolError",
    "SCXError",
    "SCXWarning",
    "ServiceError",
    "SessionError",
    "ShapeError",
    "VocabularyError",
    "WireError",
    "note_tokens",
]


class SCXError(ValueError):
    """Base class of every error scx_ref raises for bad input or a protocol violation.

    ``tokens``: for an error raised while generating, the tokens already generated (in order, before
    the failure); None otherwise. ``rows``: for an error raised while generating a batch
    (:meth:`scx_ref.hf.SCXModel.generate`), the new tokens of every row up to the failing one, that row's
    partial tokens last; None otherwise.
    """

    tokens: list[int] | None = None
    rows: list[list[int]] | None = None


class ShapeError(SCXError):
    """An array has the wrong number of dimensions or the wrong size along one."""


class DTypeError(SCXError):
    """An array has a dtype the operation does not accept."""


class NonFiniteError(SCXError):
    """An array holds NaN or ±Inf where only finite values are allowed."""


class PermutationError(SCXError):
    """An index array that must be a permutation of 0..n-1 is not one."""


class KeyScheduleError(SCXError):
    """A master secret, nonce or label is malformed."""


class ConfigError(SCXError):
    """A model or protocol configuration is inconsistent."""


class VocabularyError(SCXError):
    """A token id lies outside the model's vocabulary."""


class ProtocolError(SCXError):
    """A message violates the protocol: wrong stage, order, layer, step or length."""


class SessionError(ProtocolError):
    """A message or key belongs to another session, or a nonce is reused."""


class LimitError(ProtocolError):
    """A request exceeds one of the server's configured limits (sessions, rows, decoys, bytes, cache
    memory); it was refused and changed nothing."""


class IntegrityError(SCXError):
    """A reply failed the client's verification (shape, dtype, finiteness, or a randomized check of its
    values): the server did not compute what it was asked to. The session is aborted; nothing derived
    from the reply was used or sent."""


class WireError(ProtocolError):
    """A frame on the network is malformed: truncated, a wrong header, a size it does not hold."""


class ServiceError(SCXError):
    """The SCX server could not be reached, did not answer in time, went away, or failed internally."""


class SCXWarning(UserWarning):
    """Base class of every warning scx_ref issues: an input it accepts, whose result is not what the
    caller may expect (shown once per place by Python's default warning filter)."""


class PrecisionWarning(SCXWarning):
    """A configuration the library runs, but whose blinded stages cannot keep the exactness the project
    measured for the run's dtype (β past the limit of the dtype the blinded stages run in:
    :meth:`scx_ref.protocol.SCXConfig.precision_warning`). Every reply check still passes — the checks
    bound the server's arithmetic, not the client's choice of β."""


def note_tokens(exc: BaseException, tokens: list[int]) -> None:
    """Note on ``exc`` (an exception that is not an :class:`SCXError`, e.g. a custom transport's) the
    tokens a generation made before it: ``exc.__notes__`` (shown in its traceback from Python 3.11)."""
    text = f"scx_ref: {len(tokens)} token(s) made before the failure: {list(tokens)}"
    add = getattr(exc, "add_note", None)
    if callable(add):
        add(text)
    else:  # Python 3.10: the same attribute, not printed
        notes = getattr(exc, "__notes__", None)
        exc.__notes__ = [*(notes or []), text]  # type: ignore[attr-defined]
