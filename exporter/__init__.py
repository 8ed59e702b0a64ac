"""mcpm-export: MiniCPM checkpoints to phone-ready bundles."""
__version__ = "0.1.0"
