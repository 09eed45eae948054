"""medti's own files, written and read the same way everywhere: atomic and locked writes (atomic.py), images and
contact sheets (images.py), cached sha256 hashes, plots, and the embedding and LoRA file formats.
"""
