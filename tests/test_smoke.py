"""The shortest end-to-end path: the default teacher trains, loads and evaluates."""

from conftest import read_json


def test_default_teacher_trains_and_evaluates(cli, digits_teacher):
    r = cli("eval", "--model", digits_teacher, "--json")
    assert r.returncode == 0, r.stderr
    doc = read_json(r.stdout)
    assert doc["models"][0]["top1"] > 0.9
