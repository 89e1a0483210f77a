"""Instruction sets and the 16-bit pair saturation of INT8 kernels on CPUs without VNNI."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefm.tools import isa

needs_emulator = pytest.mark.skipif(isa.emulator() is None,
                                    reason="needs x86-64 and qemu-user (make test installs it)")


def test_features_and_vnni_are_read_from_flags():
    features = isa.isa({"avx2", "fma", "avx512f", "avx512_vnni", "sse4_2"})
    assert features == {"avx2": True, "fma": True, "avx512f": True, "avx512_vnni": True, "avx_vnni": False,
                        "amx_int8": False}
    assert isa.has_vnni(features) and not isa.has_vnni(isa.isa({"avx2", "fma"}))
    assert isa.has_vnni(isa.isa({"avx2", "avx_vnni"}))  # the AVX-VNNI of Alder Lake and later
    assert isa.avx2_only(isa.isa({"avx2", "fma"})) and not isa.avx2_only(features)
    assert not isa.avx2_only(isa.isa(set()))  # no AVX2 at all (another architecture): not such a CPU
    assert isa.SAFE_WEIGHT_PEAK == 64 and 2 * 255 * 64 <= isa.PAIR_SUM_LIMIT < 2 * 255 * 65


def matmul_qdq(path, weight: int, k: int = 64):
    """x (1 x k, quantized u8) @ W (k x 2, int8 columns +weight and -weight): ONNX Runtime runs it as
    a u8 x s8 integer product. An input of 4.0 quantizes to 255, so each pair of products sums to
    2 x 255 x weight."""
    w = np.empty((k, 2), np.int8)
    w[:, 0], w[:, 1] = weight, -weight
    initializers = [numpy_helper.from_array(np.array(4 / 255, np.float32), "x_scale"),
                    numpy_helper.from_array(np.array(0, np.uint8), "x_zero"),
                    numpy_helper.from_array(w, "w"),
                    numpy_helper.from_array(np.array(0.01, np.float32), "w_scale"),
                    numpy_helper.from_array(np.array(0, np.int8), "w_zero")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "pairs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path, 4.0 * weight * 0.01 * k  # the exact product's magnitude


def test_weight_peak_reads_the_int8_weights(tmp_path):
    path, _ = matmul_qdq(tmp_path / "m.onnx", 100)
    assert isa.weight_peak(path) == 100


@needs_emulator
def test_8_bit_weights_saturate_without_vnni_and_7_bit_weights_cannot(tmp_path):
    """The case the shipped INT8 format must survive: pairs of 255 x 127 products overflow a 16-bit
    sum on an AVX2-only CPU (emulated), pairs of 255 x 64 do not. This CPU computes both exactly
    if it has VNNI, and the 8-bit case wrongly, as the emulated CPU does, if it has not."""
    x = np.full((1, 64), 4.0, np.float32)
    full, full_exact = matmul_qdq(tmp_path / "full.onnx", 127)
    seven, seven_exact = matmul_qdq(tmp_path / "seven.onnx", isa.SAFE_WEIGHT_PEAK)
    emulated = isa.outputs_on_avx2([full, seven], x)
    assert abs(emulated[str(full)][0][0, 0] - full_exact) > 0.4 * full_exact  # saturated: about half
    np.testing.assert_allclose(emulated[str(seven)][0][0], [seven_exact, -seven_exact], rtol=1e-5)
    here = isa.run_session(full, x)[0][0]
    if isa.has_vnni(isa.isa()):
        np.testing.assert_allclose(here, [full_exact, -full_exact], rtol=1e-5)
    agreement = isa.avx2_agreement([full, seven], x)
    if not isa.has_vnni(isa.isa()):  # here the emulated CPU computes what this one does: no verdict
        assert agreement is None and not isa.can_compare()
        return
    assert agreement[str(seven)]["same"] and agreement[str(seven)]["max_abs_diff"] == 0
    assert not agreement[str(full)]["same"]


def test_without_an_emulator_nothing_is_claimed(monkeypatch, tmp_path):
    monkeypatch.setattr(isa.shutil, "which", lambda name: None)
    path, _ = matmul_qdq(tmp_path / "m.onnx", 63)
    assert isa.emulator() is None and isa.avx2_agreement([path], np.zeros((1, 64), np.float32)) is None


def test_on_a_cpu_without_vnni_the_comparison_is_not_claimed(monkeypatch, tmp_path):
    """There the emulated CPU computes what this one does: any model would pass."""
    avx2_only = {flag: flag in ("avx2", "fma") for flag in isa.ISA_FLAGS}
    monkeypatch.setattr(isa, "isa", lambda flags=None: avx2_only)
    path, _ = matmul_qdq(tmp_path / "m.onnx", 127)
    assert not isa.can_compare() and isa.avx2_agreement([path], np.zeros((1, 64), np.float32)) is None
