"""loraplex adapters: PEFT LoRA format, sources, registry, tiered cache, MultiLoRALinear and LoRA ops."""
