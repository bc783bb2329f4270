"""BatchNorm modules against torch.nn.BatchNorm*d, step by step."""
import pickle

import numpy as np
import pytest

import fastbn
from helpers import make, tol

torch = pytest.importorskip("torch")

KINDS = [
    (fastbn.BatchNorm1d, torch.nn.BatchNorm1d, (12, 4)),
    (fastbn.BatchNorm1d, torch.nn.BatchNorm1d, (6, 4, 9)),
    (fastbn.BatchNorm2d, torch.nn.BatchNorm2d, (5, 4, 6, 7)),
    (fastbn.BatchNorm3d, torch.nn.BatchNorm3d, (3, 4, 3, 4, 5)),
]


def _state_close(mine, theirs, dtype):
    rtol, atol = tol(dtype)
    tsd = theirs.state_dict()
    msd = mine.state_dict()
    assert list(msd) == list(tsd)
    for key in tsd:
        if key == "num_batches_tracked":
            assert int(msd[key]) == int(tsd[key])
            assert msd[key].dtype == np.int64 and msd[key].shape == ()
        else:
            np.testing.assert_allclose(msd[key], tsd[key].numpy(), rtol=rtol, atol=atol,
                                       err_msg=key)


@pytest.mark.parametrize("mine_cls,torch_cls,shape", KINDS)
@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 1.0])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False),
                                          (False, False)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_training_steps_then_eval(mine_cls, torch_cls, shape, momentum, affine, track, dtype):
    c = shape[1]
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    theirs = torch_cls(c, momentum=momentum, affine=affine, track_running_stats=track,
                       dtype=tdtype)
    mine = mine_cls(c, momentum=momentum, affine=affine, track_running_stats=track,
                    dtype=dtype)
    assert repr(mine) == repr(theirs)
    if affine:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.uniform_(-1, 1)
        mine.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    rtol, atol = tol(dtype)
    for step in range(3):
        for training in (True, True, False):
            mine.train(training)
            theirs.train(training)
            x = make(shape, dtype, offset=step - 1.0, scale=1.0 + step, seed=10 * step)
            gy = make(shape, dtype, seed=10 * step + 1)
            xt = torch.tensor(x, requires_grad=True)
            yt = theirs(xt)
            yt.backward(torch.tensor(gy))
            y = mine(x)
            gx = mine.backward(gy)
            np.testing.assert_allclose(y, yt.detach().numpy(), rtol=rtol, atol=atol)
            np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=rtol, atol=atol)
            if affine:
                for g, p in ((mine.grad_weight, theirs.weight), (mine.grad_bias, theirs.bias)):
                    np.testing.assert_allclose(g, p.grad.numpy(), rtol=rtol, atol=atol * 100)
                    p.grad = None
            else:
                assert mine.grad_weight is None and mine.grad_bias is None
            _state_close(mine, theirs, dtype)


def test_bias_false_keyword():
    mine = fastbn.BatchNorm2d(3, bias=False)
    theirs = torch.nn.BatchNorm2d(3, bias=False)
    assert repr(mine) == repr(theirs)
    assert mine.bias is None and mine.weight is not None
    assert list(mine.state_dict()) == list(theirs.state_dict())
    x = make((4, 3, 5, 5), np.float32)
    mine(x)
    mine.backward(x)
    assert mine.grad_bias is None and mine.grad_weight is not None


def test_defaults_and_repr():
    bn = fastbn.BatchNorm2d(64)
    assert repr(bn) == "BatchNorm2d(64, eps=1e-05, momentum=0.1, affine=True, bias=True, " \
                       "track_running_stats=True)"
    assert bn.training and bn.weight.dtype == np.float32 and bn.device == "cpu"
    assert bn.num_batches_tracked.dtype == np.int64 and bn.num_batches_tracked.shape == ()
    assert bn.train() is bn and bn.eval() is bn and not bn.training
    assert bn.to("cpu") is bn


def test_state_dict_round_trip_with_torch():
    theirs = torch.nn.BatchNorm2d(5)
    theirs.train()
    for seed in range(3):
        theirs(torch.tensor(make((4, 5, 3, 3), np.float32, seed=seed, offset=seed)))
    mine = fastbn.BatchNorm2d(5)
    mine.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    _state_close(mine, theirs, np.float32)
    back = torch.nn.BatchNorm2d(5)
    back.load_state_dict({k: torch.from_numpy(v) for k, v in mine.state_dict().items()})
    for k, v in back.state_dict().items():
        assert torch.equal(v, theirs.state_dict()[k])


def test_load_state_dict_copies_values():
    mine = fastbn.BatchNorm1d(3)
    weight_array = mine.weight
    sd = {"weight": np.full(3, 2.0), "bias": np.zeros(3), "running_mean": np.ones(3),
          "running_var": np.full(3, 4.0), "num_batches_tracked": np.array(7)}
    mine.load_state_dict(sd)
    assert mine.weight is weight_array          # same array, new values
    sd["weight"][:] = 9.0
    np.testing.assert_array_equal(mine.weight, 2.0)
    assert mine.weight.dtype == np.float32 and int(mine.num_batches_tracked) == 7


def test_version2_rule_for_missing_num_batches_tracked():
    mine = fastbn.BatchNorm1d(3)
    mine.num_batches_tracked[...] = 5
    plain = {k: v for k, v in mine.state_dict().items() if k != "num_batches_tracked"}
    mine.load_state_dict(plain)                   # no version metadata: keep our own count
    assert int(mine.num_batches_tracked) == 5
    versioned = mine.state_dict()
    del versioned["num_batches_tracked"]
    with pytest.raises(ValueError, match="Missing key.*num_batches_tracked"):
        mine.load_state_dict(versioned)           # version 2 says it must be there
    # torch agrees on both halves of the rule
    t = torch.nn.BatchNorm1d(3)
    tsd = t.state_dict()
    del tsd["num_batches_tracked"]
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        t.load_state_dict(tsd)


def test_load_state_dict_non_strict_reports_keys():
    mine = fastbn.BatchNorm1d(2)
    result = mine.load_state_dict({"weight": np.full(2, 3.0), "extra": np.zeros(1)},
                                  strict=False)
    assert "extra" in result.unexpected_keys and "bias" in result.missing_keys
    np.testing.assert_array_equal(mine.weight, 3.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pickle_round_trip(dtype):
    bn = fastbn.BatchNorm2d(3, momentum=None, dtype=dtype)
    x = make((4, 3, 2, 2), dtype, offset=3)
    bn(x)
    bn.backward(x)
    clone = pickle.loads(pickle.dumps(bn))
    assert repr(clone) == repr(bn) and clone.dtype == bn.dtype
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(clone.state_dict()[k], v)
    with pytest.raises(RuntimeError):
        clone.backward(x)      # the last input is not part of the pickled state
    np.testing.assert_array_equal(clone.eval()(x), bn.eval()(x))


def test_reset_running_stats_and_parameters():
    bn = fastbn.BatchNorm1d(3)
    bn(make((8, 3), np.float32, offset=4))
    bn.weight[...] = 2
    bn.reset_running_stats()
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    assert int(bn.num_batches_tracked) == 0
    np.testing.assert_array_equal(bn.weight, 2)
    bn.reset_parameters()
    np.testing.assert_array_equal(bn.weight, 1)


def test_empty_batch_increments_counter_only():
    bn = fastbn.BatchNorm2d(3)
    bn.running_mean[...] = 2
    y = bn(np.zeros((0, 3, 4, 4), np.float32))
    assert y.shape == (0, 3, 4, 4)
    np.testing.assert_array_equal(bn.running_mean, 2)
    assert int(bn.num_batches_tracked) == 1


def test_generic_batchnorm_accepts_any_rank():
    bn = fastbn.BatchNorm(2)
    for shape in [(4, 2), (4, 2, 3), (2, 2, 2, 2, 2, 2)]:
        assert bn(make(shape, np.float32)).shape == shape


@pytest.mark.parametrize("momentum", [0, 1, 0.5, None])
def test_repr_keeps_momentum_as_given(momentum):
    mine = fastbn.BatchNorm1d(3, momentum=momentum)
    assert repr(mine) == repr(torch.nn.BatchNorm1d(3, momentum=momentum))


def test_load_state_dict_error_text_matches_torch():
    """Missing keys, then unexpected keys, then bad values, worded as PyTorch words them."""
    sd = {"weight": np.ones(3, np.float32), "foo": np.zeros(3), "bias": np.zeros(4)}
    with pytest.raises(ValueError) as mine:
        fastbn.BatchNorm1d(3).load_state_dict(sd)
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.BatchNorm1d(3).load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    # PyTorch prints shapes as torch.Size([4]), fastbn as (4,)
    want = str(theirs.value).replace("torch.Size([4])", "(4,)").replace("torch.Size([3])", "(3,)")
    assert str(mine.value) == want


def test_load_state_dict_old_checkpoint_forms():
    """A 1-d num_batches_tracked, and _metadata = None, load as in PyTorch."""
    for count in (np.array([4]), torch.tensor([4])):
        mine = fastbn.BatchNorm1d(3)
        mine.load_state_dict(dict(mine.state_dict(), num_batches_tracked=count))
        assert mine.num_batches_tracked.shape == () and int(mine.num_batches_tracked) == 4
        assert mine.num_batches_tracked.dtype == np.int64
    theirs = torch.nn.BatchNorm1d(3)
    theirs.load_state_dict(dict(theirs.state_dict(), num_batches_tracked=torch.tensor([4])))
    assert int(theirs.num_batches_tracked) == 4
    sd = fastbn.BatchNorm1d(3).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata = None                  # no metadata: the version-2 rule keeps our count
    mine = fastbn.BatchNorm1d(3)
    mine.num_batches_tracked[...] = 9
    mine.load_state_dict(sd)
    assert int(mine.num_batches_tracked) == 9
    with pytest.raises(ValueError, match="size mismatch for num_batches_tracked"):
        mine.load_state_dict(dict(mine.state_dict(), num_batches_tracked=np.zeros(0, np.int64)))
    assert int(mine.num_batches_tracked) == 9


def test_state_dict_returns_copies():
    mine = fastbn.BatchNorm1d(3)
    sd = mine.state_dict()
    for value in sd.values():
        value[...] = 7
    assert (mine.weight == 1).all() and (mine.running_var == 1).all()
    assert int(mine.num_batches_tracked) == 0
