"""bwarea: BWArea models (world model, inverse dynamics, policy) on current PyTorch and transformers.

``import bwarea`` is cheap: torch and transformers load on first use of a name below (PEP 562), so the
``bwarea`` command answers ``--help`` at once. The transformers Auto classes learn the ``bwarea`` model type
when bwarea's model module loads, or when transformers loads its Auto classes, whichever comes first.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

__version__ = "0.1.0"

# public name -> the submodule defining it (imported on first access)
_LAZY = {
    "BWAreaConfig": "config",
    "BWAreaForCausalLM": "model",
    "BWAreaOutput": "model",
    "load_tokenizer": "tokenizer",
    "convert_released_checkpoint": "checkpoint",
    "BWAreaError": "errors",
}

__all__ = ["BWAreaConfig", "BWAreaForCausalLM", "BWAreaOutput", "load_tokenizer", "convert_released_checkpoint",
           "BWAreaError"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    else:  # a submodule, e.g. bwarea.loading
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'bwarea' has no attribute {name!r}") from None
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def _register_config(auto_module) -> None:
    from .config import BWAreaConfig
    auto_module.AutoConfig.register("bwarea", BWAreaConfig, exist_ok=True)


def _register_model(auto_module) -> None:
    importlib.import_module(f"{__name__}.model")  # registers the config and the model class on import


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a hook right after transformers executes one of its Auto modules, so that
    ``import bwarea; from transformers import AutoModelForCausalLM`` finds BWArea without bwarea loading torch
    up front. It leaves ``sys.meta_path`` once every hook has run."""

    def __init__(self, hooks: dict):
        self.hooks = hooks

    def find_spec(self, name, path=None, target=None):
        hook = self.hooks.get(name)
        if hook is None:
            return None
        del self.hooks[name]
        if not self.hooks and self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:  # the spec the other finders would have given
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_hook(module):
            exec_module(module)
            hook(module)

        loader.exec_module = exec_then_hook
        return spec


_HOOKS = {"transformers.models.auto.configuration_auto": _register_config,
          "transformers.models.auto.modeling_auto": _register_model}


def _install_hooks() -> None:
    pending = {name: hook for name, hook in _HOOKS.items() if name not in sys.modules}
    for name in _HOOKS:
        if name not in pending:  # transformers loaded it already: register now
            _HOOKS[name](sys.modules[name])
    if pending:
        sys.meta_path.insert(0, _AfterImport(pending))


_install_hooks()
