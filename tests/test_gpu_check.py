"""benchmarks/gpu_check.py --device cpu --quick: the GPU evidence run's code at tiny sizes on this CPU, with
``datasets`` made unimportable as on the GPU image (train.py on the embedded corpus and prepare-data on
local files must not need it). Every section runs: the optimizer checks, the train.py matrix (through the
child that counts reads per step), MFU's FLOP count, the code corpus, prepare-data and the two
batch-growth runs at once; what needs CUDA prints n/a."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from train_common import PY, REPO, check_ok, env


@pytest.mark.slow
def test_gpu_check_quick_runs_every_section_on_cpu(tmp_path):
    block = tmp_path / "block" / "datasets"
    block.mkdir(parents=True)
    (block / "__init__.py").write_text("raise ImportError('datasets is not on the GPU image')\n")
    work = tmp_path / "work"
    proc = subprocess.run([PY, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--work", str(work)],
                          cwd=REPO, env={**env(), "PYTHONPATH": str(block.parent)}, capture_output=True, text=True,
                          timeout=600)
    check_ok(proc)
    out = proc.stdout
    assert "failed" not in out, out
    for n in range(1, 6):
        assert re.search(rf"^{n}\. ", out, re.M), f"section {n} missing:\n{out}"
    # section 4: one row per run, a positive tokens/s; the child counted every step of each run
    rows = re.findall(r"^\s+(AdaBound|AdamW \(torch fused\))\s+(true|false)\s+([\d,]+)\s", out, re.M)
    assert sorted(r[:2] for r in rows) == [("AdaBound", "false"), ("AdamW (torch fused)", "true")], out
    assert all(int(r[2].replace(",", "")) > 0 for r in rows)
    for name in ("adabound-eager", "adamw-compiled"):
        assert len(json.loads((work / f"{name}.reads.json").read_text())) == 6
    # section 5: both arms ran to the budget on the prepared corpus, the auto one measured the noise scale
    arms = dict(re.findall(r"^\s+(constant|auto)\s+([\d,]+)\s+\d+\s+[\d.]+\s", out, re.M))
    assert set(arms) == {"constant", "auto"} and all(int(t.replace(",", "")) >= 30_000 for t in arms.values()), out
    auto = [json.loads(line) for line in open(work / "science-auto" / "metrics.jsonl")]
    assert any(r.get("noise_scale") for r in auto if r["kind"] == "train")
    assert (work / "prep" / "code" / "manifest.json").is_file()
