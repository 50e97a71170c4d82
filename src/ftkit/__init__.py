"""ftkit: declarative YAML-recipe fine-tuning for causal language models."""

__version__ = "0.1.0"
