"""Every failure path: a clear error, raised before any state changes."""
import types

import numpy as np
import pytest

import fastbn
from helpers import make


def _snapshot(bn):
    return {k: v.copy() for k, v in bn.state_dict().items()}, bn.training


def _assert_unchanged(bn, snap):
    state, training = snap
    now = bn.state_dict()
    assert list(now) == list(state)
    for k in state:
        np.testing.assert_array_equal(now[k], state[k], err_msg=k)
    assert bn.training == training


@pytest.fixture
def trained():
    bn = fastbn.BatchNorm2d(3, momentum=None)
    bn(make((4, 3, 5, 5), np.float32, offset=2))
    return bn


BAD_INPUTS = [
    (make((4, 3, 5), np.float32), ValueError, r"^expected 4D input \(got 3D input\)$"),
    (make((4, 3, 5, 5, 5), np.float32), ValueError, r"^expected 4D input \(got 5D input\)$"),
    (make((1, 3, 1, 1), np.float32), ValueError,
     r"^Expected more than 1 value per channel when training, got input size \(1, 3, 1, 1\)$"),
    (make((4, 5, 2, 2), np.float32), ValueError, r"5 channels.*num_features=3"),
    (np.ones((4, 3, 2, 2), np.int64), TypeError, r"dtype int64"),
    (np.ones((4, 3, 2, 2), np.complex64), TypeError, r"dtype complex64"),
    (np.ones((4, 3, 2, 2), object), TypeError, r"dtype object"),
    (make((4, 3, 2, 2), np.float64), TypeError, r"float64.*float32"),
    ([[1.0, 2.0, 3.0]], TypeError, r"numpy.ndarray or cupy.ndarray, got list"),
]


@pytest.mark.parametrize("x,exc,pattern", BAD_INPUTS)
def test_bad_input_changes_nothing(trained, x, exc, pattern):
    snap = _snapshot(trained)
    with pytest.raises(exc, match=pattern):
        trained(x)
    _assert_unchanged(trained, snap)


def test_rank_messages_match_torch():
    torch = pytest.importorskip("torch")
    for mine, theirs, x in [
        (fastbn.BatchNorm1d(3), torch.nn.BatchNorm1d(3), np.zeros((2, 3, 4, 5), np.float32)),
        (fastbn.BatchNorm2d(3), torch.nn.BatchNorm2d(3), np.zeros((2, 3), np.float32)),
        (fastbn.BatchNorm3d(3), torch.nn.BatchNorm3d(3), np.zeros((2, 3, 4, 5), np.float32)),
    ]:
        with pytest.raises(ValueError) as e_theirs:
            theirs(torch.from_numpy(x))
        with pytest.raises(ValueError) as e_mine:
            mine(x)
        assert str(e_mine.value) == str(e_theirs.value)
    with pytest.raises(ValueError) as e_theirs:
        torch.nn.BatchNorm1d(3)(torch.zeros(1, 3))
    with pytest.raises(ValueError) as e_mine:
        fastbn.BatchNorm1d(3)(np.zeros((1, 3), np.float32))
    assert str(e_mine.value) == str(e_theirs.value).replace("torch.Size([1, 3])", "(1, 3)")


def test_eps_zero_in_training_changes_nothing(trained):
    trained.eps = 0.0
    snap = _snapshot(trained)
    with pytest.raises(ValueError, match="eps must be > 0 when training"):
        trained(make((4, 3, 5, 5), np.float32))
    _assert_unchanged(trained, snap)


def test_backward_before_forward():
    with pytest.raises(RuntimeError, match="before any forward"):
        fastbn.BatchNorm1d(3).backward(np.zeros((2, 3), np.float32))


def test_backward_with_wrong_gradient_shape_changes_nothing(trained):
    snap = _snapshot(trained)
    with pytest.raises(ValueError, match=r"grad_output has shape \(4, 3, 5, 4\)"):
        trained.backward(make((4, 3, 5, 4), np.float32))
    with pytest.raises(TypeError, match="grad_output has dtype float64"):
        trained.backward(make((4, 3, 5, 5), np.float64))
    _assert_unchanged(trained, snap)
    assert trained.grad_weight is None


@pytest.mark.parametrize("kwargs,exc,pattern", [
    ({"num_features": 0}, ValueError, "num_features must be a positive int, got 0"),
    ({"num_features": 2.5}, TypeError, "num_features must be a positive int"),
    ({"num_features": 3, "momentum": "0.1"}, TypeError, "momentum must be a real number or None"),
    ({"num_features": 3, "eps": -1.0}, ValueError, "eps must be a finite number >= 0"),
    ({"num_features": 3, "dtype": np.int32}, TypeError, "dtype must be float32 or float64"),
    ({"num_features": 3, "device": "tpu"}, ValueError, "device must be 'cpu', 'cuda'"),
    ({"num_features": 3, "affine": 1}, TypeError, "affine must be a bool"),
])
def test_constructor_errors(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fastbn.BatchNorm2d(**kwargs)


def test_functional_errors_change_nothing():
    x = make((4, 3, 5), np.float32)
    rm = np.full(3, 0.5, np.float32)
    rv = np.full(3, 2.0, np.float32)
    cases = [
        (dict(x=make((5,), np.float32)), ValueError, r"expected at least 2D input \(got 1D"),
        (dict(weight=np.ones(4, np.float32)), ValueError, r"weight must have shape \(3,\)"),
        (dict(bias=np.ones(3, np.float64)), TypeError,
         "bias has dtype float64 but the input has dtype float32"),
        (dict(running_var=None), ValueError, "both be arrays or both be None"),
        (dict(momentum=None), TypeError, "momentum must be a real number"),
        (dict(eps=0.0), ValueError, "eps must be > 0"),
        (dict(training="yes"), TypeError, "training must be a bool"),
        (dict(x=np.ones((1, 3), np.float32)), ValueError, "Expected more than 1 value"),
    ]
    for change, exc, pattern in cases:
        args = dict(x=x, weight=None, bias=None, running_mean=rm, running_var=rv,
                    training=True, momentum=0.1, eps=1e-5)
        args.update(change)
        with pytest.raises(exc, match=pattern):
            fastbn.batch_norm_forward(**args)
        np.testing.assert_array_equal(rm, 0.5)
        np.testing.assert_array_equal(rv, 2.0)
    with pytest.raises(ValueError, match="required when training=False"):
        fastbn.batch_norm_forward(x, None, None, None, None, False, 0.1, 1e-5)


def test_read_only_running_stats_are_rejected_before_any_write():
    x = make((4, 3, 5), np.float32)
    rm = np.zeros(3, np.float32)
    rv = np.ones(3, np.float32)
    rv.flags.writeable = False
    with pytest.raises(ValueError, match="running_var is read-only"):
        fastbn.batch_norm(x, rm, rv, training=True)
    np.testing.assert_array_equal(rm, 0)


def test_bad_state_dict_changes_nothing(trained):
    snap = _snapshot(trained)
    good = trained.state_dict()
    bad_shape = dict(good, running_var=np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"size mismatch for running_var"):
        trained.load_state_dict(dict(bad_shape, weight=np.full(3, 7.0)))
    missing = {k: v for k, v in good.items() if k != "bias"}
    with pytest.raises(ValueError, match='Missing key.*"bias"'):
        trained.load_state_dict(dict(missing, weight=np.full(3, 7.0)))
    with pytest.raises(ValueError, match='Unexpected key.*"foo"'):
        trained.load_state_dict(dict(good, foo=np.zeros(1), weight=np.full(3, 7.0)))
    with pytest.raises(ValueError, match="dtype <U1"):
        trained.load_state_dict(dict(good, weight=np.array(["a", "b", "c"])))
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        trained.load_state_dict([1, 2])
    _assert_unchanged(trained, snap)


def test_set_num_threads_errors():
    before = fastbn.get_num_threads()
    with pytest.raises(ValueError, match="positive int, got 0"):
        fastbn.set_num_threads(0)
    with pytest.raises(TypeError, match="positive int"):
        fastbn.set_num_threads(2.0)
    assert fastbn.get_num_threads() == before


def test_train_mode_must_be_bool():
    bn = fastbn.BatchNorm1d(2)
    with pytest.raises(TypeError, match="mode must be a bool"):
        bn.train("eval")
    assert bn.training


def test_cuda_array_on_cpu_module_is_a_clear_type_error():
    """A CuPy-like array (duck-typed by its class module) is named and a fix suggested."""
    fake_cls = type("ndarray", (), {"__module__": "cupy", "ndim": 4,
                                    "dtype": np.dtype(np.float32), "shape": (2, 3, 4, 4)})
    bn = fastbn.BatchNorm2d(3)
    snap = _snapshot(bn)
    with pytest.raises(TypeError, match=r"on device 'cpu' but the input is a cupy.ndarray.*"
                                        r"bn.to\('cuda'\)"):
        bn(fake_cls())
    _assert_unchanged(bn, snap)
    with pytest.raises(TypeError, match=r"weight is a cupy.ndarray \(cuda\) but input is a "
                                        r"numpy.ndarray"):
        fastbn.batch_norm_forward(make((2, 3, 4, 4), np.float32), fake_cls(), None, None, None,
                                  True, 0.1, 1e-5)


def test_unusable_cuda_device_is_a_clear_error(monkeypatch):
    """Placing a module on a CUDA device that is missing names the device and the cause."""
    cupy = pytest.importorskip("cupy")

    def no_driver():
        raise cupy.cuda.runtime.CUDARuntimeError(35)   # cudaErrorInsufficientDriver

    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", no_driver)
    bn = fastbn.BatchNorm2d(3)
    snap = _snapshot(bn)
    with pytest.raises(RuntimeError, match=r"device 'cuda' is not usable on this machine: "
                                           r"CUDA reports cudaErrorInsufficientDriver"):
        bn.to("cuda")
    with pytest.raises(RuntimeError, match=r"device 'cuda:1' is not usable"):
        fastbn.BatchNorm2d(3, device="cuda:1")
    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", lambda: 1)
    with pytest.raises(ValueError, match=r"device 'cuda:1' does not exist: this machine has "
                                         r"1 CUDA device\(s\)"):
        bn.to("cuda:1")
    assert bn.device == "cpu"
    _assert_unchanged(bn, snap)


def test_module_on_cuda_refuses_an_input_on_another_gpu():
    """A module placed on "cuda" lives on cuda:0; an input on cuda:1 is a clear TypeError
    (SyncBatchNorm, which calls the kernels itself, relies on this check)."""
    from fastbn import _validation as v

    def on(index):
        return type("ndarray", (), {"__module__": "cupy",
                                    "device": types.SimpleNamespace(id=index)})()

    with pytest.raises(TypeError, match=r"BatchNorm2d is on cuda:0 but the input is on "
                                        r"cuda:1; use bn.to\('cuda:1'\)"):
        v.check_module_device("BatchNorm2d", ("cuda", None), on(1))
    v.check_module_device("BatchNorm2d", ("cuda", None), on(0))
    v.check_module_device("BatchNorm2d", ("cuda", 1), on(1))
    with pytest.raises(TypeError, match="is on cuda:1 but the input is on cuda:0"):
        v.check_module_device("BatchNorm2d", ("cuda", 1), on(0))


def _fake_cupy_array(shape, dtype=np.float32, device=0):
    """A stand-in for a cupy.ndarray (the class module and name the checks look at)."""
    a = _FAKE_CUPY()
    a.shape, a.ndim, a.dtype = tuple(shape), len(shape), np.dtype(dtype)
    a.data = types.SimpleNamespace(device_id=device)
    a.device = types.SimpleNamespace(id=device)
    return a


_FAKE_CUPY = type("ndarray", (), {"__module__": "cupy._core.core"})


def test_channel_array_checks_of_cupy_like_arrays():
    """The quick path for CuPy arrays accepts only what the full checks accept."""
    from fastbn import _validation as v
    x = _fake_cupy_array((4, 3, 5))
    names = ("weight", "bias")
    assert v.check_channel_arrays(x, names, (_fake_cupy_array((3,)), None)) is None
    with pytest.raises(TypeError, match=r"bias is on cuda:1 but input is on cuda:0"):
        v.check_channel_arrays(x, names, (_fake_cupy_array((3,)), _fake_cupy_array((3,),
                                                                                   device=1)))
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\).*got shape \(4,\)"):
        v.check_channel_arrays(x, names, (_fake_cupy_array((4,)), None))
    with pytest.raises(TypeError, match=r"bias has dtype float64 but the input has dtype "
                                        r"float32"):
        v.check_channel_arrays(x, names, (None, _fake_cupy_array((3,), np.float64)))
    with pytest.raises(TypeError, match=r"weight is a numpy.ndarray \(cpu\) but input is a "
                                        r"cupy.ndarray \(cuda\)"):
        v.check_channel_arrays(x, names, (np.ones(3, np.float32), None))
    with pytest.raises(TypeError, match=r"grad_output is on cuda:2 but input is on cuda:0"):
        v.check_same_device(x, {"grad_output": _fake_cupy_array((4, 3, 5), device=2)})
