"""Inert stand-ins for compiled extension modules that are not built.

A dry run needs the model's structure, not its ops. When a config's
``custom_imports`` fail only because a compiled extension of the imported
project is absent (CUDA ops not built, or built for a GPU this machine lacks),
:func:`import_with_stand_ins` imports the project with a stand-in module for
each such extension. A stand-in holds no code: calling anything from it raises,
so no forward can run through it, and it owns no tensors, so no weight
changes.

An import error names a compiled extension when the missing module has no
Python source in its package folder and the folder shows that it is compiled
there: a built library of that name (``NAME*.so``/``.pyd``) that failed to
load, or C/C++/CUDA sources in the folder and a ``setup.py`` above it that
names the extension (as MMDetection3D's ``projects/BEVFusion/setup.py`` names
``bev_pool_ext``, built from ``bevfusion/bev_pool/src/*.cpp, *.cu``).
"""
import importlib.abc
import importlib.util
import os
import os.path as osp
import re
import sys
import types
from typing import Callable, Iterable, List, Optional, Sequence

_CANNOT_IMPORT = re.compile(
    r"cannot import name '(\w+)' from (?:partially initialized module )?'([\w.]+)'")
_SOURCES = ('.cpp', '.cc', '.cu', '.cuh', '.c')
_BUILT = ('.so', '.pyd')


class StandIn(types.ModuleType):
    """A module whose every attribute is an op that refuses to run."""

    def __getattr__(self, name: str) -> Callable:
        if name.startswith('__'):
            raise AttributeError(name)
        module = self.__name__

        def op(*args, **kwargs):
            raise RuntimeError(f'{module}.{name} is a structure-only stand-in for a '
                               'compiled op that is not built; it cannot run')

        op.__name__ = op.__qualname__ = name
        return op


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the stand-in names first, before any other finder."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.names:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return StandIn(spec.name)

    def exec_module(self, module) -> None:
        pass


def _package_dirs(package: str) -> List[str]:
    """Folders of ``package`` on ``sys.path``, found without importing anything."""
    parts = package.split('.')
    return [d for d in (osp.join(p or os.getcwd(), *parts) for p in sys.path)
            if osp.isdir(d)]


def _names_in_setup(folder: str, depth: int, name: str) -> bool:
    """Whether a ``setup.py`` in ``folder`` or up to ``depth`` folders above names ``name``."""
    for _ in range(depth + 1):
        setup = osp.join(folder, 'setup.py')
        if osp.isfile(setup):
            with open(setup, encoding='utf-8', errors='replace') as f:
                if re.search(rf'\b{re.escape(name)}\b', f.read()):
                    return True
        folder = osp.dirname(folder)
    return False


def _is_compiled_here(package: str, name: str) -> bool:
    """Whether ``package.name`` is a compiled extension of ``package``'s folder."""
    for folder in _package_dirs(package):
        files = os.listdir(folder)
        if name + '.py' in files or osp.isdir(osp.join(folder, name)):
            return False
        if any(f.startswith(name + '.') and f.endswith(_BUILT) for f in files):
            return True  # built, but cannot be loaded here
        sources = any(f.endswith(_SOURCES) for _, _, fs in os.walk(folder) for f in fs)
        if sources and _names_in_setup(folder, len(package.split('.')), name):
            return True  # its sources are here and a setup.py builds it
    return False


def missing_extension(err: BaseException) -> Optional[str]:
    """The full name of the absent compiled extension behind an import error, if any."""
    seen = set()
    e: Optional[BaseException] = err
    chain = []
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in reversed(chain):  # the innermost cause first
        if not isinstance(e, ImportError):
            continue
        m = _CANNOT_IMPORT.search(str(e))
        if m:
            full = f'{m.group(2)}.{m.group(1)}'
        elif e.name and (isinstance(e, ModuleNotFoundError)
                         or str(e.path or '').endswith(_BUILT)):
            full = e.name
        else:
            continue
        package, _, name = full.rpartition('.')
        if package and _is_compiled_here(package, name):
            return full
    return None


def import_with_stand_ins(imports: Sequence[str],
                          allow_failed_imports: bool = False,
                          max_stand_ins: int = 32) -> List[str]:
    """Import ``custom_imports``, standing in for absent compiled extensions.

    Args:
        imports (Sequence[str]): Module names (``custom_imports.imports``).
        allow_failed_imports (bool): As in MMEngine's ``custom_imports``.
        max_stand_ins (int): Most extensions replaced before giving up.

    Returns:
        list[str]: Full names of the extensions replaced (empty when the
        imports worked as they are).

    Raises:
        ImportError: A failure that is not an absent compiled extension.
    """
    from mmengine.utils import import_modules_from_strings
    names: List[str] = []
    finder = _StandInFinder(names)
    try:
        while True:
            try:
                import_modules_from_strings(imports=list(imports),
                                            allow_failed_imports=allow_failed_imports)
                return names
            except ImportError as e:
                name = missing_extension(e)
                if name is None or name in finder.names or len(names) >= max_stand_ins:
                    raise
                names.append(name)
                finder.names.add(name)
                if finder not in sys.meta_path:
                    sys.meta_path.insert(0, finder)
                sys.modules.pop(name, None)
    finally:
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)
