"""mcq: quantize, export and validate MiniCPM-V vision-language models.

Importing mcq registers the native MiniCPM-V model with transformers' Auto classes (and the checkpoint-name
conversions), so `AutoModel.from_pretrained(dir)` works for official and mcq-written checkpoints without
`trust_remote_code`.

The registration waits for transformers: when it is already imported it happens now, otherwise right after
transformers' own import finishes (an import hook). So `import mcq` (and with it `mcq --help`, argument errors and
`mcq recipes list`) stays free of torch and transformers, which cost seconds and hundreds of MiB to import, while
`import mcq` followed by `from transformers import AutoModel` behaves as if mcq had registered first.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


def _register() -> None:
    from mcq.models import minicpmv  # noqa: F401  (registration is the import's effect)


class _Loader(importlib.abc.Loader):
    """transformers' own loader, and the registration once its module has run."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        # Put the real loader back first: transformers (and importlib.resources, pickling, reloads) see their own.
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _register()


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `transformers` is first imported, it wraps the spec the other finders give."""

    def find_spec(self, name, path, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)   # once: the registration itself imports transformers' submodules
        spec = importlib.util.find_spec(name)   # what the import would have found without this finder
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if "transformers" in sys.modules:
    _register()
elif not any(isinstance(finder, _RegisterAfterTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
