"""The README's training-step example runs and does what it says."""
import os
import re

import numpy as np

import fastbn

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_blocks():
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def test_training_step_example_runs():
    code = _python_blocks()[0]
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    bn = scope["bn"]
    assert int(bn.num_batches_tracked) == 10
    assert not np.allclose(bn.weight, 1.0)     # the SGD step moved the weight
    assert scope["y_eval"].shape == scope["x"].shape


def test_functional_example_runs_after_the_training_step():
    first, functional = _python_blocks()[:2]
    scope = {}
    exec(compile(first, "README.md", "exec"), scope)
    exec(compile(functional, "README.md", "exec"), scope)
    fresh = fastbn.BatchNorm2d(16)
    np.testing.assert_array_equal(scope["y"], fresh(scope["x"]))
    np.testing.assert_array_equal(scope["gx"], fresh.backward(scope["gy"]))
    np.testing.assert_array_equal(scope["gw"], fresh.grad_weight)
    np.testing.assert_array_equal(scope["running_mean"], fresh.running_mean)


def test_readme_commands_are_the_ci_commands():
    with open(README) as f:
        text = f.read()
    with open(os.path.join(os.path.dirname(README), ".ci", "run")) as f:
        ci = f.read()
    commands = re.findall(r"```sh\n(.*?)\n```", text, re.S)
    assert len(commands) == 2
    for cmd in commands:
        assert cmd in ci
