"""Small data files minisd needs offline: tokenizer vocabulary and model presets."""
