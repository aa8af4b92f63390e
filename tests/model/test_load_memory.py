"""Loading does not hold the weights twice: peak memory grows by about one copy of them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from openglm import Config, GLMForCausalLM, save_model

PROBE = """
import sys
import openglm, torch

def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))

openglm.load_model(sys.argv[2])  # a tiny model first: torch's lazy start-up costs are not the load's
base = kib("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current size
model = openglm.load_model(sys.argv[1])
touched = sum(float(p.detach().sum()) for p in model.parameters())  # bring every weight page into memory
print((kib("VmHWM:") - base) * 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_is_one_copy_of_the_weights(tmp_path):
    config = Config.from_name("glm-tiny", vocab_size=32768, num_layers=4)  # ~31M parameters, ~120 MiB in fp32
    model = GLMForCausalLM.from_config(config, seed=0)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    save_model(model, tmp_path / "m")
    save_model(GLMForCausalLM.from_config(Config.from_name("glm-tiny-debug")), tmp_path / "warm-up")
    del model
    grew = int(subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "m"), str(tmp_path / "warm-up")],
                              capture_output=True, text=True,
                              check=True).stdout.strip())
    assert 0.8 * nbytes < grew < 1.3 * nbytes, f"peak grew by {grew / nbytes:.2f}x the weights"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_moe_experts_load_into_their_stacked_tensors_without_a_second_copy(tmp_path):
    """The published per-expert tensors are copied into the stacked ones as they are read."""
    config = Config.from_name("glm-4.5-air-debug", hidden_size=256, num_heads=4, head_dim=64, num_layers=4,
                              num_experts=32, moe_intermediate_size=256, vocab_size=8192)  # ~110 MiB in fp32
    model = GLMForCausalLM.from_config(config, seed=0)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    save_model(model, tmp_path / "m")
    save_model(GLMForCausalLM.from_config(Config.from_name("glm-4.5-air-debug")), tmp_path / "warm-up")
    del model
    grew = int(subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "m"), str(tmp_path / "warm-up")],
                              capture_output=True, text=True, check=True).stdout.strip())
    assert 0.8 * nbytes < grew < 1.3 * nbytes, f"peak grew by {grew / nbytes:.2f}x the weights"
