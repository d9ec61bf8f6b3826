"""LLM side: backbones, soft prompt, prompt templates, candidate scoring."""
