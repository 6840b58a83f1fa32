"""Offline teacher-caching knowledge distillation for pruned LLMs."""

__version__ = "0.1.0"
