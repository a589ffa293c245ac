"""Optional libraries stay out of the runs that do not use them.

diffusers, transformers and peft import bitsandbytes and torchao while they start whenever those are installed (their
quantizer modules check for them and import them). With `sdlora[quant]` installed that costs every command about
1 s and 50 MiB on the README's 2-core machine, and bitsandbytes warns on CPUs with AVX-512 BF16 about a `kernels`
package it would fetch from the Hub, whether or not anything is quantized.

So the command line hides them (`hide`) before those libraries load, the way Python's import system provides for:
a None in `sys.modules` makes `import x` fail and `importlib.util.find_spec(x)` answer None, so each library takes
them for absent. sdlora's own code imports them through `load`, which makes them visible again first and clears
peft's cached "is it installed?" answers, so that peft still puts its bitsandbytes and torchao LoRA layers on the
layers sdlora quantized. Used as a library, sdlora hides nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

QUANTIZERS = ("bitsandbytes", "torchao")
_hidden: set[str] = set()


def hide(names: tuple[str, ...] = QUANTIZERS) -> None:
    """Make the installed, not yet imported libraries `names` look absent until `load` asks for one."""
    for name in names:
        if name not in sys.modules and importlib.util.find_spec(name) is not None:
            sys.modules[name] = None  # type: ignore[assignment]  (the import system's "not importable")
            _hidden.add(name)


def installed(name: str) -> bool:
    """Whether `name` can be imported, hidden or not."""
    return name in _hidden or importlib.util.find_spec(name) is not None


def load(name: str):
    """Import `name` (a module path), making its top-level package visible again if `hide` hid it."""
    top = name.partition(".")[0]
    if top in _hidden:
        _hidden.discard(top)
        if sys.modules.get(top, 0) is None:
            del sys.modules[top]
        peft_checks = sys.modules.get("peft.import_utils")
        for check in vars(peft_checks).values() if peft_checks else ():
            if callable(getattr(check, "cache_clear", None)):  # peft's is_bnb_available() and kin are cached
                check.cache_clear()
    return importlib.import_module(name)
