"""The config schema (sections.py) and the named presets (presets.py): pure data, no JAX."""
