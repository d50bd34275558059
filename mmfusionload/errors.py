"""Errors raised while loading checkpoints."""
from typing import Iterable, List


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
