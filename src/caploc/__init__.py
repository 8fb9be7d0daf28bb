"""caploc: find which components of a transformer carry a capability, and prove it by ablation."""

from caploc.api import *  # noqa: F403 - the public API is api's
from caploc.api import __all__ as _api_all
from caploc.components import Head, HeadLayout, Neuron, NeuronLayout
from caploc.errors import CaplocError, ParameterError
from caploc.models import load_model, wrap_model

try:  # one version, pyproject.toml's
    from importlib.metadata import PackageNotFoundError, version as _version

    __version__ = _version("caploc")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
__all__ = ["CaplocError", "ParameterError", "Head", "HeadLayout", "Neuron", "NeuronLayout", "load_model",
           "wrap_model", *_api_all, "__version__"]
