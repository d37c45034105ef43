"""Memory guard on the 2.2 GB external-data llama: load + save keeps the weights on disk."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CORPUS = Path.home() / ".cache" / "onnxforge" / "corpus"
LLAMA = CORPUS / "llama_570m_seq128_extdata.onnx"
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "io_memory.py"


@pytest.mark.slow
@pytest.mark.corpus
def test_llama_load_save_peak_memory_stays_below_the_weights(tmp_path):
    if not (LLAMA.exists() and LLAMA.with_name(LLAMA.name + ".data").exists()):
        pytest.skip(f"{LLAMA} is absent (synthetic corpus not generated)")
    out = tmp_path / "llama.onnx"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--phase", "measure", "--no-pipeline", str(LLAMA), str(out)],
        capture_output=True, text=True, check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["weight_bytes"] > 2e9
    # Goal 1.3x; in practice the weights never enter memory at all.
    assert result["peak_rss_bytes"] < 1.3 * result["weight_bytes"]
    # Tensors under 1 KB stay inline; everything else went to the fresh data file.
    assert (tmp_path / "llama.onnx.data").stat().st_size > 0.99 * result["weight_bytes"]
