"""Reports rendered in a real browser, exported checkpoints loaded by plain transformers, and the README's
API example, all on the embedded model."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import caploc
from caploc import CaplocError
from caploc.ablation import component_ablation
from caploc.masks import Masks
from caploc.store import EvalStore

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real_run(smollm, tmp_path_factory):
    """A small but real locate run of the embedded model, with specificity and universal results."""
    run_dir = tmp_path_factory.mktemp("run") / "add"
    store = caploc.EvalOptions(store=EvalStore(tmp_path_factory.mktemp("store") / "s.sqlite"))
    caploc.locate(smollm, caploc.TaskSpec("arithmetic", subtask="2D+", n=8), caploc.make_method("csb", n_masks=16),
                  k=3, evaluation=store, out=run_dir)
    caploc.specificity(smollm, suite=caploc.TaskSuite("arithmetic,general", n=8), from_run=run_dir, evaluation=store)
    caploc.universal(smollm, caploc.TaskSuite("arithmetic,general", n=4, subtask={"arithmetic": "2D+"}),
                     candidates="L0,L1", evaluation=store, out=run_dir)
    return run_dir


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_headless_chromium(real_run, tmp_path):
    written = caploc.report(real_run)
    page = Path(written["html"])
    # the run has a control task (the default `general`): its target/control effects figure comes too
    assert set(written["figures"]) == {"heatmap", "drop_curve", "specificity", "effects"}
    for png in written["figures"].values():
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 4 and "src=\"http" not in text  # self-contained
    assert "Parameters and fingerprints" in text and "Universal heads" in text and "general average" in text
    browser = _chromium()
    if browser is None:
        pytest.skip("Debian chromium is not installed (make test installs it when run as root)")
    # the page itself has no script: a copy reports every image's natural size into the title once loaded
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", "<script>window.addEventListener('load', () => { document.title = "
                                  "'sizes:' + [...document.images].map(i => i.naturalWidth + 'x' + "
                                  "i.naturalHeight).join(','); });</script></body>"))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--virtual-time-budget=5000", "--window-size=1200,2400"]
    dom = subprocess.run(flags + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    sizes = re.search(r"<title>sizes:([^<]*)</title>", dom)
    assert sizes, dom[:500]
    dims = [tuple(map(int, s.split("x"))) for s in sizes.group(1).split(",")]
    assert len(dims) == len(written["figures"]) and all(w > 0 and h > 0 for w, h in dims), dims
    shot = tmp_path / "report.png"
    subprocess.run(flags + [f"--screenshot={shot}", page.resolve().as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000


def test_report_errors_are_clear(tmp_path):
    with pytest.raises(CaplocError, match="run directory not found"):
        caploc.report(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "result.json").write_text('{"heads": [')
    with pytest.raises(CaplocError, match="corrupt"):
        caploc.report(tmp_path / "bad")


def test_export_round_trip_plain_transformers(smollm, real_run, tmp_path):
    out = tmp_path / "edited"
    before = {k: v.clone() for k, v in smollm.model.state_dict().items() if "o_proj" in k}
    written = caploc.export(smollm, from_run=real_run, out=out)
    assert all(torch.equal(v, smollm.model.state_dict()[k]) for k, v in before.items())  # restored
    heads = written["removed_heads"]
    assert heads == json.loads((real_run / "result.json").read_text())["ranking"][:3]
    assert {"config.json", "model.safetensors", "caploc_export.json"} <= {p.name for p in out.iterdir()}
    tok = smollm.tokenizer
    ids = tok("Question: What is 48 plus 76?\nAnswer: 124", return_tensors="pt")["input_ids"]
    np.save(tmp_path / "ids.npy", ids.numpy())
    # a fresh interpreter where importing caploc fails: plain transformers must load the checkpoint
    script = (
        "import sys; sys.modules['caploc'] = None\n"
        "import numpy as np, torch, transformers\n"
        f"model = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32).eval()\n"
        f"transformers.AutoTokenizer.from_pretrained({str(out)!r})\n"
        f"ids = torch.from_numpy(np.load({str(tmp_path / 'ids.npy')!r}))\n"
        "with torch.no_grad():\n"
        f"    np.save({str(tmp_path / 'exported.npy')!r}, model(ids).logits.numpy())\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    exported = torch.from_numpy(np.load(tmp_path / "exported.npy"))
    layout = smollm.layout
    with torch.no_grad():
        with component_ablation(smollm.model).applied(
                Masks.from_sets([[layout.index(h) for h in layout.parse_list(heads)]], layout.n_total)):
            hooked = smollm.model(ids).logits
        plain = smollm.model(ids).logits
    assert (exported - hooked).abs().max().item() <= 1e-5
    assert (plain - hooked).abs().max().item() > 1e-3  # the edit is real
    with pytest.raises(CaplocError, match="not empty"):
        caploc.export(smollm, "L0H0", out=out)


def test_readme_api_example_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 12
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "add" / "report.html").exists()
    assert (tmp_path / "runs" / "add" / "model" / "model.safetensors").exists()
