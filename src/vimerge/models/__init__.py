"""Models: the Vim architecture, the registry of named presets, checkpoint loading."""

from .registry import create_model, list_models, model_defaults, register_model
from .vim import VisionMamba

__all__ = ["create_model", "list_models", "model_defaults", "register_model", "VisionMamba"]
