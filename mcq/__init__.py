"""mcq: quantize, export and validate MiniCPM-V vision-language models."""

__version__ = "0.1.0"
