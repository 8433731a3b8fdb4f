"""Which checkpoints our model code computes exactly, and the refusal of every other one.

A family is what a config.json's `model_type` names: the Llama-shaped decoders whose math our
one layer implements (stage_service/model.py), each with the few switches it needs. A config is
read against its family field by field: a field that changes the math and that our code does
not implement (an unknown `model_type`, experts, a rope type, softcapping, an activation other
than SiLU, a quantized checkpoint...) is refused in one line naming the field, its value and
what is supported. Wrong output must be impossible: a field we do not know is refused unless it
is known to leave the math alone, or it holds its "off" value (null, false, 0, empty).

Sliding-window attention is exact within the window: a family whose window is in use serves a
context of at most the window (`context_limit`), where full and sliding attention are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from protos.errors import FailedPrecondition


@dataclass(frozen=True)
class Family:
    """The switches of one family's layer: biases on the q/k/v projections and on the output
    projection, per-head RMSNorm of q and k before RoPE (Qwen3)."""

    model_type: str
    architecture: str
    qkv_bias: bool | None  # None: from config.json's attention_bias
    o_bias: bool | None
    qk_norm: bool = False


FAMILIES = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaForCausalLM", qkv_bias=None, o_bias=None),
        Family("mistral", "MistralForCausalLM", qkv_bias=False, o_bias=False),
        Family("qwen2", "Qwen2ForCausalLM", qkv_bias=True, o_bias=False),
        Family("qwen3", "Qwen3ForCausalLM", qkv_bias=None, o_bias=None, qk_norm=True),
    )
}
ROPE_TYPES = ("default", "linear", "llama3", "dynamic")

# Fields our code reads (protos.shared.model_files.LlamaArgs.from_config) ...
IMPLEMENTED = {
    "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
    "tie_word_embeddings", "attention_bias", "mlp_bias", "hidden_act", "sliding_window",
    "use_sliding_window", "max_window_layers", "layer_types",
    "llamadist_submodel",  # our own record of a submodel's range (protos/shared/submodel.py)
}  # fmt: skip
# ... and fields that leave inference's math alone (training, tokens, bookkeeping).
HARMLESS = {
    "_name_or_path", "_model_name_or_path", "unk_token_id", "transformers_version",
    "torch_dtype", "dtype", "use_cache",
    "initializer_range", "attention_dropout", "hidden_dropout", "bos_token_id", "eos_token_id",
    "pad_token_id", "sep_token_id", "decoder_start_token_id", "id2label", "label2id",
    "return_dict", "output_attentions", "output_hidden_states", "torchscript",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "problem_type", "tokenizer_class", "prefix", "task_specific_params", "finetuning_task",
    "architectures_version", "pretraining_tp", "tie_encoder_decoder", "pruned_heads",
    "cross_attention_hidden_size", "bad_words_ids", "use_bfloat16", "tf_legacy_loss",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "temperature",
    "top_k", "top_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "typical_p", "diversity_penalty",
    "num_beam_groups", "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "use_return_dict", "_attn_implementation",
    "_attn_implementation_autoset", "_commit_hash", "auto_map", "keys_to_ignore_at_inference",
    "base_model_tp_plan", "base_model_pp_plan", "attn_implementation", "output_router_logits",
}  # fmt: skip


def _off(value) -> bool:
    return value is None or value is False or value == 0 or value in ("", [], {})


def _refuse(field: str, value, supported: str) -> FailedPrecondition:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return FailedPrecondition(
        f"config.json {field}={shown} is not supported: {supported}; llamadist refuses a "
        "checkpoint it cannot compute exactly"
    )


def family_of(cfg: dict) -> Family:
    """The config's family, every field checked (FailedPrecondition naming the first that our
    code does not compute)."""
    model_type = cfg.get("model_type", "llama")  # old Llama checkpoints name none
    family = FAMILIES.get(model_type)
    if family is None:
        raise _refuse("model_type", model_type, "one of " + ", ".join(FAMILIES))
    architectures = cfg.get("architectures") or [family.architecture]
    if architectures != [family.architecture]:
        raise _refuse("architectures", architectures, f"[{family.architecture!r}]")
    if cfg.get("hidden_act", "silu") != "silu":
        raise _refuse("hidden_act", cfg["hidden_act"], "'silu' (SwiGLU)")
    for key in ("rope_parameters", "rope_scaling"):  # new and old spelling: both are read
        rope = cfg.get(key) or {}
        if not isinstance(rope, dict):
            raise _refuse(key, rope, "an object")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise _refuse(f"{key}.rope_type", rope_type, "one of " + ", ".join(ROPE_TYPES))
    if family.qkv_bias is not None and cfg.get("attention_bias") not in (None, family.qkv_bias):
        raise _refuse(
            "attention_bias", cfg["attention_bias"], f"{family.qkv_bias} for {model_type}"
        )
    if family.model_type != "llama" and not _off(cfg.get("mlp_bias")):
        raise _refuse("mlp_bias", cfg["mlp_bias"], f"false for {model_type}")
    for name, value in cfg.items():
        if name not in IMPLEMENTED and name not in HARMLESS and not _off(value):
            raise _refuse(name, value, "a field our model code does not implement")
    return family


def context_limit(cfg: dict) -> int | None:
    """The most positions a session may reach for our attention to equal the model's: the
    sliding window where one is in use (full and windowed attention agree up to it), and for
    dynamic RoPE the original context (past it transformers rescales RoPE as the sequence
    grows); None: no limit beyond max_position_embeddings."""
    limits = []
    window = cfg.get("sliding_window")
    in_use = cfg.get("use_sliding_window", cfg.get("model_type") == "mistral")
    if window and in_use:
        limits.append(int(window))
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) == "dynamic":
        original = rope.get("original_max_position_embeddings")
        limits.append(int(original or cfg.get("max_position_embeddings", 2048)))
    return min(limits) if limits else None
