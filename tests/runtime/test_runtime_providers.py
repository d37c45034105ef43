"""Provider profiles: option generation for cuda/tensorrt, shape ranges, search spaces."""
import pytest

from onnxforge.errors import OptionError, ProviderError
from onnxforge.runtime.profile import Profile, default_profile
from onnxforge.runtime.providers import PROVIDERS, profile_module, provider_fusions
from onnxforge.runtime.shapes import ShapeRange, opt_shapes, parse_shape_ranges
from onnxforge.runtime.space import thread_counts
from onnxforge.runtime.tune import _apply, _differs

cuda = profile_module("cuda")
trt = profile_module("tensorrt")
cpu = profile_module("cpu")


def test_every_provider_module_keeps_the_fusion_api():
    for name in PROVIDERS:
        module = profile_module(name)
        assert isinstance(provider_fusions(name), tuple)
        assert module.QUANT_FORMAT in ("qdq-u8s8", "qdq-s8s8-symmetric")
        assert module.ORT_NAME.endswith("ExecutionProvider")
    assert cpu.QUANT_FORMAT == "qdq-u8s8" and trt.QUANT_FORMAT == cuda.QUANT_FORMAT == "qdq-s8s8-symmetric"


def test_cuda_provider_options_as_onnxruntime_wants_them():
    name, opts = cuda.ort_provider({"device_id": 1, "use_tf32": False, "prefer_nhwc": "yes", "io_binding": True,
                                    "cudnn_conv_algo_search": "heuristic", "enable_cuda_graph": True})
    assert name == "CUDAExecutionProvider"
    assert opts == {"device_id": "1", "use_tf32": "0", "prefer_nhwc": "1", "cudnn_conv_algo_search": "HEURISTIC",
                    "enable_cuda_graph": "1"}  # io_binding is onnxforge's, not a provider option


def test_cpu_takes_no_provider_options():
    assert cpu.ort_provider({}) == ("CPUExecutionProvider", {})
    with pytest.raises(ProviderError, match="unknown option"):
        cpu.ort_provider({"intra_op_num_threads": 2})


@pytest.mark.parametrize("spec,expected", [
    ("ids:1x16-8x128-16x512", ShapeRange((1, 16), (8, 128), (16, 512))),
    ("ids:1x16-16x512", ShapeRange((1, 16), (16, 512), (16, 512))),
    ("x:1x3x224x224", ShapeRange(*((1, 3, 224, 224),) * 3)),
    ("a:b:2x2", ShapeRange(*((2, 2),) * 3)),  # names may hold colons
    ("sr:", ShapeRange((), (), ())),
])
def test_shape_ranges(spec, expected):
    name, rng = next(iter(parse_shape_ranges([spec]).items()))
    assert rng == expected and name == spec.rpartition(":")[0]


@pytest.mark.parametrize("spec,fragment", [
    ("ids:8x16-1x16-16x16", "min <= opt <= max"),
    ("ids:1x16-8x128x2-16x512", "same rank"),
    ("ids:1-2-3-4", "at most three"),
    ("ids:1xq", "integers"),
    ("ids:0x4", "positive"),
    ("1x16", "NAME:SHAPE"),
])
def test_bad_shape_ranges(spec, fragment):
    with pytest.raises(OptionError, match=fragment):
        parse_shape_ranges([spec])


def test_duplicate_shape_range_refused():
    with pytest.raises(OptionError, match="twice"):
        parse_shape_ranges(["x:1", "x:2"])


def test_tensorrt_profile_shapes_from_ranges():
    ranges = parse_shape_ranges(["input_ids:1x16-8x128-16x512", "attention_mask:1x16-8x128-16x512"])
    inputs = {"input_ids": ("batch", "seq"), "attention_mask": ("batch", "seq")}
    opts = trt.profile_shape_options(ranges, inputs)
    assert opts == {
        "trt_profile_min_shapes": "input_ids:1x16,attention_mask:1x16",
        "trt_profile_opt_shapes": "input_ids:8x128,attention_mask:8x128",
        "trt_profile_max_shapes": "input_ids:16x512,attention_mask:16x512",
    }
    name, forwarded = trt.ort_provider(opts)
    assert name == "TensorrtExecutionProvider" and forwarded == opts
    assert opt_shapes(ranges) == {"input_ids": (8, 128), "attention_mask": (8, 128)}


@pytest.mark.parametrize("specs,inputs,fragment", [
    (["ids:1x16-8x128-16x512"], {"ids": ("b", "s"), "mask": ("b", "s")}, "mask need an --input-shape range"),
    (["nope:1x16"], {"ids": ("b", "s")}, "no such input"),
    (["ids:1x16x1-8x128x1-16x512x1"], {"ids": ("b", "s")}, "rank"),
    (["x:1x3x224x224-4x3x224x224-8x4x224x224"], {"x": ("n", 3, 224, 224)}, "dim 1 is fixed at 3"),
])
def test_tensorrt_profile_shapes_checked_against_the_model(specs, inputs, fragment):
    with pytest.raises(ProviderError, match=fragment):
        trt.profile_shape_options(parse_shape_ranges(specs), inputs)


def test_tensorrt_caches_are_created_and_forwarded(tmp_path):
    prof = default_profile("tensorrt", cache_dir=tmp_path / "cache")
    assert [e.name for e in prof.providers] == ["tensorrt", "cuda", "cpu"]
    opts = prof.providers[0].options
    assert opts["trt_engine_cache_enable"] and opts["trt_timing_cache_enable"]
    _, forwarded = trt.ort_provider(opts)
    assert forwarded["trt_engine_cache_path"] == str(tmp_path / "cache" / "engines")
    assert (tmp_path / "cache" / "engines").is_dir() and (tmp_path / "cache" / "timing").is_dir()
    assert "io_binding" not in forwarded


def test_cpu_search_space_follows_cores_and_shapes():
    dims = {d.name: d for d in cpu.search_space(static_shapes=True, cores=8)}
    threads = [v.get("intra_op_num_threads") for v in dims["intra_op_threads"].values]
    assert threads == [None, 8, 4, 2, 1]  # None: onnxruntime's own choice first
    assert any("enable_mem_pattern" in v for v in dims["memory"].values)
    dynamic = {d.name: d for d in cpu.search_space(static_shapes=False, cores=1)}
    assert not any("enable_mem_pattern" in v for v in dynamic["memory"].values)
    assert "execution_mode" not in dynamic  # no parallel branches on one core
    assert thread_counts(2) == [2, 1] and thread_counts(1) == [1]


def test_gpu_search_spaces_gate_cuda_graphs_and_lossy_options():
    static = {d.name for d in cuda.search_space(static_shapes=True)}
    dynamic = {d.name for d in cuda.search_space(static_shapes=False)}
    assert "cuda_graph" in static and "cuda_graph" not in dynamic and "tf32" not in static
    assert "tf32" in {d.name for d in cuda.search_space(allow_lossy=True)}
    assert "fp16" not in {d.name for d in trt.search_space()}
    assert "fp16" in {d.name for d in trt.search_space(allow_lossy=True)}
    assert "cuda_graph" not in {d.name for d in trt.search_space(static_shapes=False)}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_every_candidate_in_every_space_is_a_valid_profile(provider, tmp_path):
    base = default_profile(provider, cache_dir=tmp_path)
    for dim in profile_module(provider).search_space(static_shapes=True, allow_lossy=True, cores=4):
        for value in dim.values:
            candidate = _apply(base, dim, value)
            assert isinstance(candidate, Profile)
            if value:
                assert not _differs(candidate, dim, value)


@pytest.mark.gpu
def test_cuda_io_binding_runner_matches_cpu(tmp_path):
    import numpy as np
    import onnx
    import onnx.parser

    from onnxforge.runtime import make_runner, session
    from onnxforge.runtime.env import probe_provider
    from onnxforge.runtime.session import outputs_as_numpy

    if not probe_provider("cuda", "CUDAExecutionProvider").works:
        pytest.skip("CUDA execution provider does not work on this machine (see `onnxforge env`)")
    path = tmp_path / "m.onnx"
    onnx.save(onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x) => (float[2, 4] y) { y = Relu(x) }"""), path)
    prof = default_profile("cuda")
    prof.providers[0].options["enable_cuda_graph"] = True
    sess = session(path, prof)
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    run = make_runner(sess, [{"x": x}], prof)
    for i in range(3):
        np.testing.assert_allclose(outputs_as_numpy(run(i))[0], np.maximum(x, 0))


def test_io_binding_runner_feeds_a_scalar_as_a_scalar():
    # A scalar input bound through IO binding must stay 0-d; np.ascontiguousarray made it [1],
    # which onnxruntime refuses for an input declared as a scalar. Runs on the CPU device, the
    # same binding path the CUDA profiles take.
    import numpy as np
    import onnx
    import onnx.parser
    import onnxruntime as ort

    from onnxforge.runtime.session import io_binding_runner, outputs_as_numpy

    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x, float s) => (float[2, 4] y, float t) { y = Mul(x, s)  t = Identity(s) }""")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    run = io_binding_runner(sess, [{"x": x, "s": np.array(2.5, np.float32)}], "cpu")
    for i in range(2):
        y, t = outputs_as_numpy(run(i))
        np.testing.assert_allclose(y, x * 2.5)
        assert t.shape == () and t == 2.5
