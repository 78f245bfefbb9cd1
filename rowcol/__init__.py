"""rowcol: parameter-efficient vision models that use one weight W as both W and Wᵀ.

``import rowcol`` registers the PE models (and their small-image dense twins) in timm's
registry, so ``timm.create_model('vit_pe_small_patch16_224')`` works. Nothing else happens
at import: no seeding, no logging setup, no backend flags.
"""
from rowcol import models  # noqa: F401  (registers models with timm)
from rowcol.halve import NothingToHalveError, halve
from rowcol.layers import PeAttention, PeMlp, TiedLinear
from rowcol.models import create_model, dense_twin, pe_models, pe_spec
from rowcol.stats import count_params

__version__ = '0.1.0'
__all__ = ['TiedLinear', 'PeMlp', 'PeAttention', 'halve', 'NothingToHalveError', 'count_params', 'create_model',
           'dense_twin', 'pe_models', 'pe_spec', '__version__']
