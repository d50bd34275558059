"""Errors raised while loading checkpoints, and how a file's values are named in them."""
from typing import Any, Iterable, List


class FusionLoadError(RuntimeError):
    """A load that cannot be done as asked.

    Every problem found while reading, planning and validating is collected
    first, so one error lists all of them; the model is left untouched.

    Args:
        problems (Iterable[str]): One line per problem, each naming the file,
            the key and the shapes involved where they apply.
        title (str): First line of the message.

    Attributes:
        report (LoadReport, optional): The report of the failed load, when the
            error comes from :func:`~mmfusionload.load_sources`.
    """
    report = None

    def __init__(self, problems: Iterable[str], title: str = 'checkpoint load failed'):
        self.problems: List[str] = [str(p) for p in problems]
        self.title = title
        lines = [f'{title} ({len(self.problems)} problem'
                 f'{"s" if len(self.problems) != 1 else ""}):']
        lines += [f'  - {p}' for p in self.problems]
        super().__init__('\n'.join(lines))


def describe(value: Any, limit: int = 60) -> str:
    """A short text for a value read from a checkpoint, in time bounded by ``limit``.

    Never calls ``str``/``repr`` of a container or an object the file built (a
    tuple of 40 shared levels prints 2**40 leaves; a deep one overflows the C
    stack): strings and bytes are cut before ``repr``, numbers of at most 64 bits
    are shown, anything else is named by its type (and length).
    """
    kind = type(value)
    if kind is str or kind is bytes:
        text = repr(value[:limit])
        return text + ('...' if len(value) > limit else '')
    if kind is bool or value is None:
        return repr(value)
    if kind is int:
        return repr(value) if value.bit_length() <= 64 else f'<int of {value.bit_length()} bits>'
    if kind is float:
        return repr(value)
    if kind in (tuple, list, dict, set, frozenset):
        return f'<{kind.__name__} of {len(value)} items>'
    return f'<{kind.__name__}>'
