"""Training data: prompt JSONL, answer regeneration, chat tokenisation, feature cache, input pipeline."""
