"""LoRA fine-tuning on voiced chat data and export of the adapter to llama.cpp's GGUF form."""
