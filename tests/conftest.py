import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# tests share the dequantized-model cache with the Makefile's demo (CAPLOC_CACHE is exported there)
os.environ.setdefault("CAPLOC_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "caploc"))


@pytest.fixture(scope="session")
def smollm():
    """The real embedded model (SmolLM2-135M-Instruct, fp32), loaded once for the whole session."""
    from caploc import load_model

    return load_model("smollm2-135m", dtype="float32")
