"""`MiniCPMV`: the MiniCPM-V 2.6 / 4.0 / 4.5 model, loadable from official checkpoints without remote code.

Module tree and parameter names equal the official release: `llm` (a transformers causal LM: Qwen3, Qwen2 or
Llama, chosen by `versions.py`), `vpm` (navit SigLIP, `vision.py`) and `resampler` (`resampler.py`). The public
methods keep the official signatures — `forward(data)`, `generate(...)`, `chat(...)`, `get_vllm_embedding(data)` —
so existing user code runs unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from threading import Thread
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, TextIteratorStreamer
from transformers import initialization as init

from .configuration import MiniCPMVConfig
from .resampler import Resampler, ResamplerAttention
from .tokenization import special_token_ids
from .versions import VersionSpec, embedding_scale, version_spec
from .vision import MiniCPMVisionEmbeddings, MiniCPMVisionTransformer


class MiniCPMVPreTrainedModel(PreTrainedModel):
    config: MiniCPMVConfig
    config_class = MiniCPMVConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _no_split_modules = ["SiglipEncoderLayer", "Resampler", "Qwen3DecoderLayer", "Qwen2DecoderLayer",
                         "LlamaDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The official init of each part (resampler.py `_init_weights`, SigLIP's embeddings); Linears, norms and
        # embeddings elsewhere take transformers' defaults.
        if isinstance(module, Resampler):
            init.trunc_normal_(module.query, std=0.02)
            init.normal_(module.proj.weight, std=module.embed_dim**-0.5)
        elif isinstance(module, ResamplerAttention):
            # xavier_uniform over the packed [3D, D] in-projection, as nn.MultiheadAttention initialises it
            bound = (6 / (4 * module.embed_dim)) ** 0.5
            for linear in (module.q_proj, module.k_proj, module.v_proj):
                init.uniform_(linear.weight, -bound, bound)
                init.zeros_(linear.bias)
            init.zeros_(module.out_proj.bias)
            init.trunc_normal_(module.out_proj.weight, std=0.02)
        elif isinstance(module, MiniCPMVisionEmbeddings):
            init.normal_(module.position_embedding.weight, std=module.position_embedding.embedding_dim**-0.5)
            init.lecun_normal_(module.patch_embedding.weight)
            init.zeros_(module.patch_embedding.bias)
        else:
            super()._init_weights(module)


class MiniCPMV(MiniCPMVPreTrainedModel):
    def __init__(self, config: MiniCPMVConfig):
        super().__init__(config)
        self.spec: VersionSpec = version_spec(config.version)
        llm_config = self.spec.llm_config(config)
        vision_config = config.vision_config
        attn = config._attn_implementation or "sdpa"
        llm_config._attn_implementation = attn
        vision_config._attn_implementation = attn
        if config.drop_vision_last_layer:
            vision_config = vision_config.__class__(**{**vision_config.to_dict(),
                                                       "num_hidden_layers": vision_config.num_hidden_layers - 1})
            vision_config._attn_implementation = attn
        self.llm = self.spec.llm_model_class(llm_config)
        self.vpm = MiniCPMVisionTransformer(vision_config)
        hidden = llm_config.hidden_size
        self.resampler = Resampler(
            num_queries=config.query_num, embed_dim=hidden, num_heads=hidden // 128,
            kv_dim=vision_config.hidden_size, temporal=self.spec.temporal,
        )
        self.post_init()

    # -- transformers plumbing ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        if getattr(model, "is_loaded_in_4bit", False):   # set by transformers on bitsandbytes 4-bit models only
            # SigLIP's 4304-wide MLP cannot take bitsandbytes' AVX512-BF16 CPU path: without this, an nf4
            # checkpoint loaded with plain `AutoModel.from_pretrained` fails in its first vision forward.
            from mcq.models.bnb_runtime import disable_unsupported_cpu_repacking

            disable_unsupported_cpu_repacking(model)
        return model

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.llm.lm_head = value

    @property
    def embedding_scale(self) -> float:
        """MiniCPM-family LLMs (4.0) multiply text embeddings (never vision features) by `scale_emb`."""
        return embedding_scale(self.config)

    # -- vision ---------------------------------------------------------------------------------------------------
    def get_vision_embedding(
        self,
        pixel_values: Sequence[torch.Tensor],
        tgt_sizes: torch.Tensor,
        temporal_ids: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """Slices (each `[3, patch, patch * n]`) → resampled features `[G, query_num, hidden]`.

        All slices are padded to the longest, run through the vision tower in chunks of `vision_batch_size` (each
        chunk cut to its own longest slice: a padded patch costs as much as a real one, and the calibration driver,
        which runs one slice per chunk, must see no padding), then through the resampler together (temporal groups
        must be seen whole; its key mask hides the padding, which is zeros here).
        """
        patch = self.vpm.patch_size
        device, dtype = self.vpm.post_layernorm.weight.device, self.vpm.post_layernorm.weight.dtype
        tgt_sizes = torch.as_tensor(tgt_sizes, dtype=torch.long).reshape(-1, 2)
        max_patches = int((tgt_sizes[:, 0] * tgt_sizes[:, 1]).max())
        # Each slice is a row of patches: flatten to [n*patch, 3*patch], pad, and fold back (official packing).
        rows = [p.to(device=device, dtype=dtype).flatten(end_dim=1).permute(1, 0) for p in pixel_values]
        packed = nn.utils.rnn.pad_sequence(rows, batch_first=True)
        packed = packed.permute(0, 2, 1).reshape(len(rows), 3, patch, -1)
        lengths = (tgt_sizes[:, 0] * tgt_sizes[:, 1]).to(device)
        patch_mask = torch.arange(max_patches, device=device)[None, :] < lengths[:, None]
        chunk = max(int(self.config.vision_batch_size), 1)
        features = []
        for i in range(0, len(rows), chunk):
            longest = int(lengths[i : i + chunk].max())
            out = self.vpm(packed[i : i + chunk, ..., : longest * patch], patch_mask[i : i + chunk, :longest],
                           tgt_sizes[i : i + chunk])
            features.append(nn.functional.pad(out, (0, 0, 0, max_patches - longest)))
        return self.resampler(torch.cat(features), tgt_sizes, temporal_ids)

    def get_vllm_embedding(self, data: dict[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Text embeddings with the vision features written over the `<unk>` slots named by `image_bound`."""
        input_ids = data["input_ids"]
        inputs_embeds = self.get_input_embeddings()(input_ids)
        if self.embedding_scale != 1.0:
            inputs_embeds = inputs_embeds * self.embedding_scale
        vision_hidden_states = data.get("vision_hidden_states")
        if vision_hidden_states is None:
            vision_hidden_states = self._vision_states_per_sample(data)
        image_bounds = data.get("image_bound") or [None] * len(input_ids)
        merged = []
        for sample, (embeds, bounds) in enumerate(zip(inputs_embeds, image_bounds)):
            features = vision_hidden_states[sample] if sample < len(vision_hidden_states) else None
            if bounds is None or len(bounds) == 0 or features is None or len(features) == 0:
                merged.append(embeds)
                continue
            positions = torch.cat([torch.arange(int(s), int(e)) for s, e in torch.as_tensor(bounds).tolist()])
            flat = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
            if len(positions) != len(flat):
                raise ValueError(f"sample {sample}: {len(positions)} image slots in the text but {len(flat)} vision "
                                 "features (placeholders and images disagree)")
            embeds = embeds.clone()
            embeds[positions.to(embeds.device)] = flat
            merged.append(embeds)
        return torch.stack(merged), vision_hidden_states

    def _vision_states_per_sample(self, data: dict[str, Any]) -> list[torch.Tensor]:
        pixel_values = data.get("pixel_values") or []
        tgt_sizes = data.get("tgt_sizes") or []
        temporal_ids = data.get("temporal_ids")
        slices = [p for sample in pixel_values for p in sample]
        if not slices:
            return [torch.empty(0) for _ in pixel_values]
        sizes = torch.cat([torch.as_tensor(t, dtype=torch.long).reshape(-1, 2) for t in tgt_sizes if len(t)])
        groups, counts = None, [len(sample) for sample in pixel_values]
        if temporal_ids is not None and self.spec.temporal:
            # One output block per temporal group (the official code splits by slice count, which loses the
            # features of every sample after the first in a batched video call).
            groups = [group for sample in temporal_ids for group in (sample or [])]
            counts = [len(sample or []) for sample in temporal_ids]
        features = self.get_vision_embedding(slices, sizes, groups)
        return list(torch.split(features, counts))

    # -- language model -------------------------------------------------------------------------------------------
    def forward(self, data: dict[str, Any] | torch.Tensor | None = None, **kwargs):
        """Official call form `forward(data)`: `data` holds input_ids, pixel_values, tgt_sizes, image_bound
        (and temporal_ids, position_ids, attention_mask). A bare tensor means text only. Keyword form works too."""
        if isinstance(data, torch.Tensor):
            return self.llm(input_ids=data, **kwargs)
        data = dict(data or {})
        for key in ("input_ids", "pixel_values", "tgt_sizes", "image_bound", "temporal_ids", "vision_hidden_states"):
            if key in kwargs:
                data[key] = kwargs.pop(key)
        for key in ("attention_mask", "position_ids"):
            if key in data and key not in kwargs:
                kwargs[key] = data[key]
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"].long()
        inputs_embeds, _ = self.get_vllm_embedding(data)
        return self.llm(inputs_embeds=inputs_embeds, **kwargs)

    def terminator_ids(self, tokenizer) -> list[int]:
        return special_token_ids(tokenizer).terminator_ids(self.spec.terminators)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values=None,
        tgt_sizes=None,
        image_bound=None,
        temporal_ids=None,
        attention_mask: torch.Tensor | None = None,
        tokenizer=None,
        vision_hidden_states=None,
        return_vision_hidden_states: bool = False,
        stream: bool = False,
        decode_text: bool = False,
        **kwargs,
    ):
        """Generate from a processed batch; returns the new tokens only (or text with `decode_text`)."""
        if tokenizer is None:
            raise ValueError("generate() needs the tokenizer (its terminator tokens end generation)")
        data = {"input_ids": input_ids, "pixel_values": pixel_values, "tgt_sizes": tgt_sizes,
                "image_bound": image_bound, "temporal_ids": temporal_ids,
                "vision_hidden_states": vision_hidden_states}
        inputs_embeds, vision_hidden_states = self.get_vllm_embedding(data)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=inputs_embeds.device)
        terminators = self.terminator_ids(tokenizer)
        gen_kwargs = dict(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=terminators, **kwargs)
        if stream:
            return self._stream(tokenizer, gen_kwargs)
        with self._generated_tokens_scaled():
            output = self.llm.generate(**gen_kwargs)
        result = self._decode_text(output, tokenizer, terminators) if decode_text else output
        return (result, vision_hidden_states) if return_vision_hidden_states else result

    def _stream(self, tokenizer, gen_kwargs: dict[str, Any]) -> Iterator[str]:
        # Decoded like the non-streaming answer: special tokens kept, terminators removed (official stream_gen).
        streamer = TextIteratorStreamer(tokenizer)
        with self._generated_tokens_scaled():
            thread = Thread(target=self.llm.generate, kwargs={**gen_kwargs, "streamer": streamer}, daemon=True)
            thread.start()
            for text in streamer:
                for terminator in self.spec.terminators:
                    text = text.replace(terminator, "")
                if text:
                    yield text
            thread.join()

    @contextmanager
    def _generated_tokens_scaled(self) -> Iterator[None]:
        """`llm.generate` embeds each new token with the bare embedding table; a forward over the same tokens
        multiplies text embeddings by `embedding_scale` (4.0). Scale them during generation too, so a greedy answer
        is the argmax of the model's own teacher-forced logits (and of llama.cpp's, which scales every input)."""
        if self.embedding_scale == 1.0:
            yield
            return
        hook = self.llm.get_input_embeddings().register_forward_hook(
            lambda _module, _args, output: output * self.embedding_scale)
        try:
            yield
        finally:
            hook.remove()

    @staticmethod
    def _decode_text(output: torch.Tensor, tokenizer, terminators: list[int]) -> list[str]:
        texts = []
        for row in output.tolist():
            while row and (row[-1] in terminators or row[-1] == tokenizer.pad_token_id):
                row = row[:-1]
            for end, token in enumerate(row):
                if token in terminators:
                    row = row[:end]
                    break
            texts.append(tokenizer.decode(row))
        return texts

    # -- chat -----------------------------------------------------------------------------------------------------
    def chat(
        self,
        image=None,
        msgs=None,
        tokenizer=None,
        processor=None,
        vision_hidden_states=None,
        max_new_tokens: int = 2048,
        min_new_tokens: int = 0,
        sampling: bool = True,
        max_inp_length: int | None = None,
        system_prompt: str = "",
        stream: bool = False,
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
        temporal_ids=None,
        enable_thinking: bool = False,
        **kwargs,
    ):
        """The official chat API: `msgs` is a list of {"role", "content"} turns, content a string or a list of
        PIL images and strings (a list of such lists is a batch). `sampling=False` is beam search (3 beams,
        repetition penalty 1.2) as in the release; pass `num_beams=1, repetition_penalty=1.0` for greedy."""
        from .chat import build_chat_inputs, generation_settings

        processor = processor or self._default_processor(tokenizer)
        tokenizer = tokenizer or processor.tokenizer
        max_inp_length = max_inp_length or self.spec.max_inp_length
        inputs, batched = build_chat_inputs(
            self, processor, image=image, msgs=msgs, system_prompt=system_prompt, max_inp_length=max_inp_length,
            max_slice_nums=max_slice_nums, use_image_id=use_image_id, temporal_ids=temporal_ids,
            enable_thinking=enable_thinking,
        )
        settings = generation_settings(self.spec, sampling, enable_thinking, min_new_tokens, kwargs)
        device = self.llm.device
        inputs["input_ids"] = inputs["input_ids"].to(device)
        inputs["attention_mask"] = inputs["attention_mask"].to(device)
        inputs.pop("image_sizes", None)
        result = self.generate(**inputs, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                               vision_hidden_states=vision_hidden_states, stream=stream, decode_text=True,
                               **settings)
        if stream:
            return result
        if enable_thinking:
            result = ["<think>\n" + text for text in result]
        return result if batched else result[0]

    def _default_processor(self, tokenizer):
        from .processing import MiniCPMVProcessor

        source = self.config.name_or_path
        if not source:
            raise ValueError("chat() needs `processor=` when the model was not loaded from a directory")
        return MiniCPMVProcessor.from_pretrained(source, tokenizer=tokenizer)

