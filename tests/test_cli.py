"""The ``sparse-attn`` command line: version, help texts, argument conflicts."""

import pytest

from sparse_attn import __version__
from sparse_attn.cli import main


def test_version(capsys):
    for flag in ("--version", "-V"):
        assert main([flag]) == 0
        assert capsys.readouterr().out.strip() == f"sparse-attn {__version__}"


def test_usage_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "--version" in out and all(name in out for name in ("bench", "train-gates", "demo"))
    assert main(["nonsense"]) == 2


def test_demo_help_names_the_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sparse-attn demo ")
    # the whole first paragraph of the description, not its first line cut mid-sentence
    assert "check it against dense masked attention, print density, error, time." in " ".join(out.split())


def test_demo_refuses_model_with_no_hf(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--no-hf", "--model", "some/dir"])
    assert info.value.code == 2
    assert "--no-hf" in capsys.readouterr().err
