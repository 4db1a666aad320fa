"""Exporters: a MiniCPM-V checkpoint (or an `mcq quantize` output of it) → the files another runtime serves.

One subpackage per format (`gguf` for llama.cpp / Ollama, `onnx` for onnxruntime); each writes through
`mcq.outputs.staged_output`, so a failed export leaves nothing behind, and each output carries a model card and a
manifest like the quantized variants do.
"""
