"""One YAML reader for run configs and protocols: one-line errors naming the file and the problem."""

from __future__ import annotations

import pytest

from multichex.training.config import load_config, read_yaml
from multichex.training.protocol import is_protocol, load_protocol


@pytest.mark.parametrize(
    "text, message",
    [
        ("seed: [1,\n", r"bad\.yaml: invalid YAML at line 2, column 1: expected the node content"),
        ("a: b: c\n", r"bad\.yaml: invalid YAML at line 1, column 5: mapping values are not allowed here"),
        ("- epochs: 2\n- seed: 1\n", r"bad\.yaml: the top level must be a mapping of keys \(key: value\), not a list"),
        ("just words\n", r"bad\.yaml: the top level must be a mapping .*, not a string"),
    ],
)
def test_every_reader_refuses_a_bad_file_in_one_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    for read in (read_yaml, load_config, load_protocol, is_protocol):
        with pytest.raises(ValueError, match=message) as caught:
            read(path)
        assert "\n" not in str(caught.value), str(caught.value)


def test_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.yaml: not UTF-8 text"):
        read_yaml(path)


def test_an_empty_file_is_an_empty_mapping(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert read_yaml(path) == {} and not is_protocol(path)
    assert load_config(path, {"epochs": 3}).epochs == 3
    (tmp_path / "p.yaml").write_text("phases: []\n")
    assert is_protocol(tmp_path / "p.yaml")
