"""``QuantizerBuilder`` for DeepSpeed users: the build description, plus a ``load()`` that never builds.

DeepSpeed's op builders compile their extension on first ``load()``. qkit's
kernels are compiled ahead of time into ``qkit._C`` (from this same
description, by ``setup.py``), so ``load()`` only checks that they loaded and
returns the module with DeepSpeed's function names.
"""

from __future__ import annotations

from types import ModuleType

from qkit import _builder, _loader


class QuantizerBuilder(_builder.QuantizerBuilder):
    """DeepSpeed's ``QuantizerBuilder`` (``NAME = "quantizer"``) backed by the prebuilt ``qkit._C``.

    ``sources()``, ``include_paths()`` and ``extra_ldflags()`` (``-lcurand`` on CUDA, none
    on ROCm) describe what ``qkit._C`` is built from; ``setup.py`` reads the same class.
    """

    def is_compatible(self, verbose: bool = False) -> bool:
        """Always True: the kernels ship prebuilt, so there is nothing to check at build time."""
        return True

    def load(self, verbose: bool = True) -> ModuleType:
        """Return the quantizer module (:mod:`qkit.deepspeed.quantizer_op`); never compiles.

        Args:
            verbose: accepted for DeepSpeed compatibility; there is no build to report on.

        Raises:
            qkit.QkitLoadError: the compiled kernels could not be loaded (the message says
                what was built, what is running and what to do).
        """
        _loader.require()
        from qkit.deepspeed import quantizer_op

        return quantizer_op
