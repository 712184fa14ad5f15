"""The bytes of the checkpoints quantkern writes are pinned: a refactor must leave every one of them as
it was (GPTQ act-order and asymmetric 3-bit, AWQ, W8A8 and FP8 in compressed-tensors, GGUF).

The figures come from tests/fixtures/pinned_checkpoints.py run in a child process with the numerics
pinned to one thread and AVX2 code paths (MKL, oneDNN, ATen), so that AVX2 and AVX-512 machines agree:
natively, AWQ's scale search does not (measured: the AWQ checkpoint differs between the two paths).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "pinned_checkpoints.py"
PINNED_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_CBWR": "AVX2,STRICT",
              "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def test_checkpoint_bytes_are_pinned(tmp_path):
    out = tmp_path / "digests.json"
    env = {**os.environ, **PINNED_ENV}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(FIXTURE), str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    pinned = json.loads(FIXTURE.with_name("pinned_checkpoints.json").read_text())
    assert set(got) == set(pinned)
    changed = {name: (pinned[name], got[name]) for name in pinned if got[name] != pinned[name]}
    assert not changed, f"checkpoint bytes changed (pinned, now): {changed}"
