"""The modules a LoRA adapter may target: the projection names (module leaf names) of the Llama / Mistral /
Qwen2 / Qwen3 decoder layers, plus the token embedding and the output projection (found by role: the model's
input and output embeddings, whatever their leaf names). Defined here once; injection, the model loader's shape
report and the synthetic adapters all read it."""

from __future__ import annotations

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGET_MODULES = (*ATTENTION_TARGETS, *MLP_TARGETS)
# The leaf names of the input and output embeddings in the families we serve (PEFT targets them by these names).
EMBEDDING_TARGET = "embed_tokens"
HEAD_TARGET = "lm_head"
