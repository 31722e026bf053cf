"""Model families. ``create_model(name, **overrides)`` and ``list_models()`` are the entry points."""
from moh.models.factory import MODELS, create_model, list_models, model_config  # noqa: F401
from moh.models import vit, llm, dit  # noqa: F401,E402  (register presets)
