"""DELRec: distil a conventional sequential recommender's pattern into soft prompts for an LLM."""

__version__ = "0.1.0"
