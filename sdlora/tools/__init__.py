"""The LoRA workshop: merge, resize, extract and analyse adapters. Pure functions over per-module updates
(`updates.py`); the CLI and the web UI call them."""
