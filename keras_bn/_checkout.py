"""`keras_bn.converters` in a source checkout, as one copy of its modules.

An installed keras-bn has its converters at `keras_bn/converters` (pyproject
maps the repository's `converters/` folder there). In a source checkout that
folder sits next to `keras_bn/`, not inside it: `load_converters` then imports
it under the name `keras_bn.converters`, and `alias_converters` makes the
checkout's old top-level name `converters` (and `converters.<module>`) refer to
the very same module objects. Two copies of a module would give two
`ChannelAffine` classes, and `isinstance` checks and Keras's registry of
serializable classes would then disagree about which one is real.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

PACKAGE = "keras_bn.converters"
ALIAS = "converters"


def _checkout_folder() -> str | None:
    """The checkout's `converters/` folder, if `keras_bn` runs from a checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(here, "converters")):
        return None  # installed: keras_bn/converters is a real subpackage
    root = os.path.dirname(here)
    folder = os.path.join(root, ALIAS)
    if os.path.isfile(os.path.join(folder, "__init__.py")) and os.path.isfile(
        os.path.join(root, "pyproject.toml")
    ):
        return folder
    return None


def load_converters() -> None:
    """Makes `keras_bn.converters` importable when it is not installed as such.

    Does nothing in an installed package, where `keras_bn/converters` is a
    subpackage. In a checkout (editable install included) the folder next to
    this `keras_bn/` is loaded, never another checkout's.
    """
    folder = _checkout_folder()
    if folder is None or PACKAGE in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        PACKAGE,
        os.path.join(folder, "__init__.py"),
        submodule_search_locations=[folder],
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACKAGE]
        raise
    sys.modules["keras_bn"].converters = module


class _AliasLoader(importlib.abc.Loader):
    """Loads `converters.<name>` as the module `keras_bn.converters.<name>`."""

    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def exec_module(self, module):
        # The import system stamped the alias spec on the module: restore the
        # real one (the module was executed already, under its real name).
        module.__spec__ = self._spec

    def get_code(self, fullname):  # `python -m converters.cli`
        spec = importlib.util.find_spec(self.target)
        return spec.loader.get_code(self.target)

    def is_package(self, fullname):
        spec = importlib.util.find_spec(self.target)
        return spec.submodule_search_locations is not None


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Finds `converters.<name>` as an alias of `keras_bn.converters.<name>`."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(ALIAS + "."):
            return None
        real = PACKAGE + fullname[len(ALIAS) :]
        found = importlib.util.find_spec(real)
        if found is None:
            return None
        spec = importlib.machinery.ModuleSpec(
            fullname,
            _AliasLoader(real),
            origin=found.origin,
            is_package=found.submodule_search_locations is not None,
        )
        spec.has_location = found.has_location
        return spec


def alias_converters() -> None:
    """Makes the top-level `converters` the same module as `keras_bn.converters`.

    Called by `converters/__init__.py` when it is imported under its top-level
    name (possible only in a checkout, whose root is on `sys.path`).
    """
    real = importlib.import_module(PACKAGE)
    sys.modules[ALIAS] = real
    for name, module in list(sys.modules.items()):
        if name.startswith(PACKAGE + "."):
            sys.modules[ALIAS + name[len(PACKAGE) :]] = module
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
