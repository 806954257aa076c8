"""Every ```python snippet of the README runs as written, on this machine (CPU included).

The snippets run in order in one namespace (later ones use the tensors of the Quick start), so the
README reads as one session. A snippet may only use what the set-up installs.
"""

import os
import re

import pytest
import torch

_README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _snippets():
    text = open(_README, encoding="utf-8").read()
    return [(text[: m.start()].count("\n") + 2, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


def test_there_are_snippets():
    assert len(_snippets()) >= 4


def test_readme_snippets_run_in_order():
    pytest.importorskip("transformers")
    namespace = {"__name__": "readme"}
    torch.manual_seed(0)
    for line, code in _snippets():
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as exc:  # noqa: BLE001 - name the snippet
            raise AssertionError(f"the README snippet at line {line} fails: {type(exc).__name__}: {exc}") from exc
    # the snippets did what they say
    assert namespace["out"].shape == namespace["q"].shape
    assert namespace["q"].grad is not None and torch.isfinite(namespace["q"].grad).all()
    assert namespace["logits"].shape == (1, 40, 256) and torch.isfinite(namespace["logits"]).all()
