"""The benchmark harness on a tiny detector: every field, ratios against the reference, profiles."""

import time

import numpy as np
import pytest
from PIL import Image

from edgefm.cli import main
from edgefm.config import BenchConfig
from edgefm.stages.measuring import block_flops, detector_blocks
from edgefm.tools import bench
from edgefm.tools.bench import (
    Variant,
    benchmark,
    block_times,
    camera_latencies,
    count_flops,
    latencies,
    machine,
    operator_profile,
    peak_memory,
)
from edgefm.tools.export import export_onnx, node_scopes
from test_detector import tiny_detector

FIELDS = {"name", "format", "precision", "map", "map50", "latency_ms_1t", "latency_ms_2t",
          "latency_p90_ms_1t", "latency_p90_ms_2t", "size_bytes", "params", "flops", "gflops_2t",
          "ceiling_fraction_2t", "throughput_2t", "peak_memory_bytes", "latency_speedup_1t",
          "latency_speedup_2t", "size_reduction", "map_drop", "latency_after_idle_ms_1t",
          "latency_after_idle_ms_2t", "latency_camera_ms_1t", "latency_camera_ms_2t", "camera_speedup_2t",
          "latency_speedup_2t_range", "camera_speedup_2t_range"}


def test_harness_returns_every_field_with_ratios_against_the_first(tmp_path):
    model = tiny_detector()
    flops = count_flops(model, 64)
    params = sum(p.numel() for p in model.parameters())
    variants = [Variant("torch", module=model, flops=flops, params=params),
                Variant("onnx", onnx=export_onnx(model, tmp_path / "m.onnx", 64), flops=flops, params=params)]
    scores = {"torch": 0.5, "onnx": 0.4}
    settings = BenchConfig(runs=3, warmup=1, throughput_batch=2, pause_ms=0, camera_frames=3, repeats=3)
    evaluated, between = [], []
    results = benchmark(variants, 64, settings,
                        lambda v: evaluated.append(v.name) or {"map": scores[v.name], "map50": 0.6},
                        between=[lambda: between.append("first"), lambda: time.sleep(0.5)])
    torch_record, onnx_record = results["variants"]
    assert set(torch_record) >= FIELDS and set(onnx_record) >= FIELDS
    assert evaluated == ["torch", "onnx"]  # each once
    # the harness's own work (throughput, memory) fills the first gap, the caller's the second
    _, second, third = results["repeat_started_s"]
    assert between == ["first"] and third - second >= 0.5
    assert torch_record["latency_speedup_2t"] == 1.0 and torch_record["size_reduction"] == 1.0
    for ratio, latency in (("latency_speedup_2t", "latency_ms_2t"),
                           ("camera_speedup_2t", "latency_camera_ms_2t")):
        ratios = [a / b for a, b in zip(torch_record[f"{latency}_repeats"], onnx_record[f"{latency}_repeats"],
                                        strict=True)]
        assert len(ratios) == 3 and onnx_record[ratio] == pytest.approx(float(np.median(ratios)))
        assert onnx_record[f"{ratio}_range"] == [min(ratios), max(ratios)]
        assert onnx_record[latency] == pytest.approx(float(np.median(onnx_record[f"{latency}_repeats"])))
    assert onnx_record["map_drop"] == pytest.approx(0.1)
    assert onnx_record["format"] == "onnx" and torch_record["format"] == "pytorch"
    assert 0 < onnx_record["latency_ms_2t"] <= onnx_record["latency_p90_ms_2t"]
    assert torch_record["peak_memory_bytes"] > 10e6  # a whole Python process with torch
    assert flops > 2 * params  # every weight is used at least once per image, for 2 FLOPs
    assert {c["threads"] for c in results["ceiling"]} == {1, 2}
    assert all(c["fp32_gflops"] > 0 and c["int8_gops"] > 0 for c in results["ceiling"])
    assert set(results["machine"]["isa"]) >= {"avx2", "avx512_vnni"}


def test_spread_cuts_work_in_order_into_one_share_per_gap():
    assert bench.spread(list("abcdefg"), 2) == [list("abc"), list("defg")]
    assert bench.spread(list("ab"), 0) == [list("ab")]  # a single repeat does it all after itself
    assert bench.spread([], 2) == [[], []]


class SlowAfterIdle(Variant):
    """A stand-in model that takes 2 ms, or 20 ms when it has been idle for over 15 ms: it counts the
    runs it is given, so the test sees how the harness turns them into timings. (Gaps this wide
    keep it deterministic on a machine busy with other tests.)"""

    calls = 0

    def runner(self, threads):
        last = [0.0]

        def run(images):
            type(self).calls += 1
            idle = time.perf_counter() - last[0] > 15e-3
            time.sleep(20e-3 if idle else 2e-3)
            last[0] = time.perf_counter()
            return (images,)

        return run


def test_latencies_time_back_to_back_runs_and_report_the_first_after_a_pause_apart():
    SlowAfterIdle.calls = 0
    settings = BenchConfig(runs=6, warmup=2, burst=3, pause_ms=40)
    timing = latencies([SlowAfterIdle("m")], 8, 1, settings)["m"]
    assert SlowAfterIdle.calls == 2 + 2 * (3 + 1)  # warm-up, then 2 turns of 1 untimed + 3 timed
    assert timing["median_ms"] < 11 < timing["after_idle_ms"]
    paused = latencies([SlowAfterIdle("m")], 8, 1, BenchConfig(runs=4, warmup=1, burst=1, pause_ms=40))["m"]
    assert paused["after_idle_ms"] > 11 > paused["median_ms"]  # burst 1: every after-idle run follows a pause


def test_camera_frames_arrive_at_the_frame_rate_and_pay_the_wake_up():
    SlowAfterIdle.calls = 0
    started = time.perf_counter()
    ms = camera_latencies([SlowAfterIdle("m")], 8, 1, BenchConfig(camera_fps=20, camera_frames=5))["m"]
    assert SlowAfterIdle.calls == 1 + 5  # one untimed run, then the frames
    assert time.perf_counter() - started >= 4 * 0.05  # each frame starts a 50 ms period after the last
    assert ms > 11  # every frame follows an idle gap: the slow case, unlike back-to-back runs


def test_operator_profile_attributes_the_time_to_operator_types(tmp_path):
    path = export_onnx(tiny_detector(), tmp_path / "m.onnx", 64)
    profile = operator_profile(path, 64, threads=1, runs=4)
    assert profile["kernels_ms"] == pytest.approx(sum(profile["ms_by_op_type"].values()))
    assert 0 < profile["kernels_ms"] <= 1.5 * profile["wall_ms"]  # the kernels of one run, not of five
    assert {"MatMul", "Conv"} & set(profile["ms_by_op_type"]) and profile["integer_products_ms"] == 0  # FP32
    times = list(profile["ms_by_op_type"].values())
    assert times == sorted(times, reverse=True)
    assert profile["ms_by_part"] is None  # no scopes given
    # with the exporter's scopes, to the two halves of the detector, fused kernels included
    halves = operator_profile(path, 64, threads=1, runs=4, scopes=node_scopes(path))["ms_by_part"]
    assert set(halves) == {bench.ENCODER, bench.NECK} and all(ms > 0 for ms in halves.values())


def test_kernels_count_for_the_half_of_the_detector_they_run_in():
    scopes = {"node_Conv_1": "backbone.vit.patch_embed.proj", "node_MatMul_2": "backbone.vit.blocks.0.attn",
              "node_Conv_3": "pyramid.levels.0", "node_Conv_4": "head.box.0", "node_sub": ""}
    names = ["node_sub", "conv2d_nchwc", "node_Conv_1", "node_MatMul_2/MatMulScaleFusion/",
             "SkipLayerNormalization", "node_Conv_3", "node_upsample", "relu_nchwc", "node_Conv_4"]
    encoder, neck = bench.ENCODER, bench.NECK
    assert bench._parts_of_kernels(names, scopes) == [encoder] * 5 + [neck] * 4
    assert bench.detector_part("backbone.net.stages.1") == encoder  # a CNN student's backbone too


def test_machine_names_the_cpu_and_versions():
    info = machine()
    assert info["cpu"] and info["cores"] >= 1 and info["torch"] and info["onnxruntime"]


def test_peak_memory_of_a_missing_model_fails_clearly(tmp_path):
    with pytest.raises(RuntimeError, match="gone"):
        peak_memory(Variant("gone", onnx=tmp_path / "missing.onnx"), 64)


def test_block_profile_covers_the_forward_pass():
    model = tiny_detector()
    blocks = detector_blocks(model)
    assert list(blocks) == ["patch embedding", "ViT block 0", "ViT block 1", "pyramid", "head"]
    times = block_times(model, blocks, 64, threads=1, runs=3)
    assert all(times[name] > 0 for name in blocks)
    assert sum(times[name] for name in blocks) <= times["total"] * 1.01
    flops = block_flops(model, blocks, 64)
    assert all(flops[name] > 0 for name in blocks)
    assert sum(flops.values()) <= count_flops(model, 64)


def test_bench_cli_names_a_corrupt_onnx_file(fashion_dir, tmp_path, capsys):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx model")
    assert main(["--profile", "smoke", "bench", str(bad), "--init", "random", "--no-memory"]) == 2
    assert "broken.onnx" in capsys.readouterr().err


def test_export_and_bench_cli_in_smoke(fashion_dir, tmp_path, capsys):
    out = tmp_path / "a.onnx"
    assert main(["--profile", "smoke", "export", "--init", "random", "--out", str(out)]) == 0
    assert out.is_file() and (tmp_path / "a.onnx.data").is_file()
    capsys.readouterr()
    assert main(["--profile", "smoke", "bench", str(out), "--init", "random", "--runs", "2", "--no-memory",
                 "--out", str(tmp_path / "bench.json")]) == 0
    printed = capsys.readouterr().out
    assert "A (PyTorch FP32)" in printed and "a.onnx" in printed
    assert (tmp_path / "bench.json").is_file()
    Image.new("RGB", (40, 30)).save(tmp_path / "scene.png")
    assert main(["--profile", "smoke", "predict", str(tmp_path / "scene.png"), "--init", "random",
                 "--onnx", str(tmp_path / "missing.onnx")]) == 2
    assert "missing.onnx: no such ONNX model" in capsys.readouterr().err
