"""Every command's --help prints and exits 0 (argparse formats each help text only then)."""

import pytest

from keras_fg.cli.predict import main as predict_main
from keras_fg.cli.train import main as train_main
from keras_fg.export.cli import main as export_main


@pytest.mark.parametrize("main", [train_main, predict_main, export_main])
def test_help_prints_every_flag(main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and "--" in out
