"""Training helpers (the `[train]` extra): which parameters each stage trains and LoRA presets (`stages`), grid
labels, the SFT data collator and the TRL trainer subclass (`sft`). The scripts in `training/` drive them.

Building MOSS-Speech from a text LLM is pure weight copying and lives with the model:
`MossSpeechForCausalLM.from_text_model` (`modeling_moss_speech.modeling_moss_speech.from_text_model`).
"""
