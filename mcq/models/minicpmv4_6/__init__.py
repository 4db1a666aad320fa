"""MiniCPM-V 4.6: SigLIP2 vision tower with a window-attention `vit_merger` after layer `insert_layer_id`, a
downsampling MLP `merger`, and a Qwen3.5 hybrid LLM (Gated DeltaNet linear attention and full attention, 3:1).

Native in transformers (`transformers.models.minicpmv4_6`): mcq uses its classes and its on-disk layout as they
are, and this folder holds only what mcq needs to know about them (`family.py`), how calibration encodes samples
for them and runs their forward (`calibration.py`), and the tiny checkpoint (`tiny.py`).
Sources: transformers 5.17's `models/minicpmv4_6`, vLLM 0.32's `minicpmv4_6.py` (shared/research notes, §3 of
runtimes_and_versions.md)."""
