"""The demo's CI run: ``python -m mhpo_kernels demo --smoke`` end to end."""
import importlib.util
import json

from mhpo_kernels import demo


def test_demo_smoke(tmp_path):
    out = tmp_path / "demo"
    assert demo.main(["--smoke", "--quiet", "--out", str(out)]) == 0
    log = json.loads((out / "demo_log.json").read_text())
    assert set(log["runs"]) == {"mhpo", "clip"}
    for name, rows in log["runs"].items():
        assert len(rows) == log["args"]["steps"]
        for key in ("reward", "loss", "grad_norm", "kl_old", "tokens_per_s", "loss_mem_fused_bytes"):
            assert all(isinstance(r[key], float) or isinstance(r[key], int) for r in rows), (name, key)
    assert all(r["survival_mean"] is not None for r in log["runs"]["mhpo"])
    mem = log["loss_memory"]
    assert mem["fused_bytes_estimate"] < mem["eager_bytes_estimate"]
    from mhpo_kernels._bench_utils import PeakMemory

    if PeakMemory("cpu").method == "vmhwm":  # measured where the high-water mark can be reset
        assert 0 < mem["fused_bytes_measured"] < mem["eager_bytes_measured"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "demo_curves.png").stat().st_size > 0


def test_memory_estimate_large_vocab():
    import torch

    fused, eager = demo.memory_estimate(4096, 151936, 512, torch.bfloat16, 512)
    assert fused < 0.15 * eager
