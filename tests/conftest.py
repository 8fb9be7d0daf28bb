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
    from tiny import DEVICE

    if DEVICE.type != "cpu":  # an accelerator machine for the tiny-model tests need not have the package
        pytest.skip("the embedded model's tests run on the CPU")
    return load_model("smollm2-135m", dtype="float32")


@pytest.fixture(scope="session")
def planted():
    """A tiny model whose only heads with any output are the PLANTED ones, and a task they carry."""
    from caploc import wrap_model
    from tiny import PlantedTask, byte_tokenizer, planted_model

    model = planted_model()
    tok = byte_tokenizer()
    return wrap_model(model, tok, spec="planted"), PlantedTask(model, tok)


class CliRun:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys):
    """`caploc ARGS...` in this process (no interpreter start-up): exit code, stdout, stderr."""
    from caploc.cli import main

    def run(*args) -> CliRun:
        capsys.readouterr()
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        out = capsys.readouterr()
        return CliRun(code, out.out, out.err)

    return run


@pytest.fixture(scope="session")
def redundant():
    """A tiny model with a redundant head pair and a decoy (tiny.redundant_model), and its planted task."""
    from caploc import wrap_model
    from tiny import PlantedTask, byte_tokenizer, redundant_model

    model = redundant_model()
    tok = byte_tokenizer()
    return wrap_model(model, tok, spec="redundant"), PlantedTask(model, tok)
