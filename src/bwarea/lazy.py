"""Package attributes that load their submodule on first use (PEP 562), so importing a package stays cheap
(``bwarea.rl.settings`` and ``bwarea.train.settings`` import without torch; the CLI's parser relies on it)."""

from __future__ import annotations

import importlib


def lazy_attributes(package: str, table: dict[str, str]):
    """-> (__getattr__, __dir__) for ``package``: attribute name -> the submodule (relative name) defining it."""
    module = importlib.import_module(package)

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{table[name]}"), name)
        setattr(module, name, value)
        return value

    def __dir__():
        return sorted(set(vars(module)) | set(table))

    return __getattr__, __dir__
