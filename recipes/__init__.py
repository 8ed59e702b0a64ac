"""The recipe files (one TOML per model variant), shipped as package data; read by exporter/recipes.py."""
