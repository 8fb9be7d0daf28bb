"""caploc: find which components of a transformer carry a capability, and prove it by ablation."""

from caploc.errors import CaplocError
from caploc.heads import Head, HeadLayout
from caploc.models import load_model, wrap_model
from caploc.api import (compare, compress, density, evaluate, export, locate, neurons, report, specificity,
                        universal)

__version__ = "0.1.0"
__all__ = ["CaplocError", "Head", "HeadLayout", "load_model", "wrap_model", "evaluate", "locate", "specificity",
           "universal", "compare", "report", "export", "neurons",
           "density", "compress", "__version__"]
