"""Small files (results, run records, cache manifests) are written whole or not at all."""

import os

import pytest

from hf_lorsa.base import writing
from hf_lorsa.base.writing import write_atomically


def test_a_write_cut_off_before_its_rename_leaves_the_old_file_and_no_leftovers(tmp_path, monkeypatch):
    path = tmp_path / "eval_results.json"
    write_atomically(path, '{"fvu": 0.1}')
    assert path.read_text() == '{"fvu": 0.1}' and oct(path.stat().st_mode & 0o777) == "0o644"

    def killed(source, target):
        raise KeyboardInterrupt  # the process stops between writing and renaming

    monkeypatch.setattr(writing.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, '{"fvu": 0.2}')
    assert path.read_text() == '{"fvu": 0.1}'
    assert os.listdir(tmp_path) == ["eval_results.json"]
