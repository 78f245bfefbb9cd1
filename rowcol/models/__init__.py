"""rowcol's model families. Importing this package registers every model in timm's registry."""
from rowcol.models import resnet, vit  # noqa: F401  (registration only)
from rowcol.models._registry import (PeSpec, check_model_name, create_model, dense_twin, model_defaults,
                                    pe_models, pe_spec)

__all__ = ['PeSpec', 'check_model_name', 'create_model', 'dense_twin', 'model_defaults', 'pe_models', 'pe_spec']
