"""The README's training-step example runs and does what it says."""
import os
import re

import numpy as np

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


def test_readme_commands_are_the_ci_commands():
    with open(README) as f:
        text = f.read()
    with open(os.path.join(os.path.dirname(README), ".ci", "run")) as f:
        ci = f.read()
    commands = re.findall(r"```sh\n(.*?)\n```", text, re.S)
    assert len(commands) == 2
    for cmd in commands:
        assert cmd in ci
