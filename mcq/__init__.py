"""mcq: quantize, export and validate MiniCPM-V vision-language models.

Importing mcq registers the native MiniCPM-V model with transformers' Auto classes (and the checkpoint-name
conversions), so `AutoModel.from_pretrained(dir)` works for official and mcq-written checkpoints without
`trust_remote_code`.
"""

__version__ = "0.1.0"

from mcq.models import minicpmv as _minicpmv  # noqa: E402,F401  (registration is the import's effect)
