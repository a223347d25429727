"""Model plumbing beyond plain Hugging Face directories: LoRA adapters (``lora``), GGUF files
(``gguf``) and named models installed from packages (``aliases``)."""
