"""The one exception type sparsify raises for every refusal."""

__all__ = ["SparsifyError"]


class SparsifyError(Exception):
    """Raised whenever sparsify refuses an input, a model or a setting.

    The message always says what was wrong and what to do about it.
    """
