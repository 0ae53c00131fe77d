"""The export runner: filters, resume after a kill -9 at every publishing step, dask equals local, export.json and
its random-weights label, the CLI's input errors, and (with the SLURM cluster) SLURM array tasks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.export import filters
from pipeline.export.base import RANDOM_WEIGHTS_LABEL
from pipeline.export.filters import ExportFilter, ExportFilterError
from pipeline.export.runner import ExportError, export_run
from tests.conftest import needs_slurm_cluster
from tests.exportrun import make_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def handmade(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("handmade"))


def tree(dest: Path) -> dict[str, bytes]:
    """Every file of an export but its resume state."""
    return {p.relative_to(dest).as_posix(): p.read_bytes() for p in sorted(dest.rglob("*"))
            if p.is_file() and ".masklet-export" not in p.relative_to(dest).parts}


def kept(dest: Path) -> dict[str, list[str]]:
    return {d.name: sorted(p.name for p in d.iterdir()) for d in sorted(dest.iterdir())
            if d.is_dir() and d.name != ".masklet-export"}


@pytest.mark.parametrize("filt, expected", [
    (ExportFilter(), {"a.mp4": ["000", "001", "002"], "b.mp4": ["000", "001"], "c.jpg": []}),
    (ExportFilter(items=("b.mp4",)), {"b.mp4": ["000", "001"]}),
    (ExportFilter(items_glob="*.mp4", items=("c.jpg",)), {"a.mp4": ["000", "001", "002"], "b.mp4": ["000", "001"],
                                                           "c.jpg": []}),
    (ExportFilter(flags=("flicker", "lost")), {"a.mp4": ["001"], "b.mp4": ["000", "001"], "c.jpg": []}),
    (ExportFilter(no_flags=("tiny",)), {"a.mp4": ["000", "001"], "b.mp4": ["001"], "c.jpg": []}),
    (ExportFilter(flags=("tiny",), no_flags=("fragmented",)), {"a.mp4": [], "b.mp4": ["000"], "c.jpg": []}),
    (ExportFilter(min_frames_visible=5), {"a.mp4": ["000", "001"], "b.mp4": [], "c.jpg": []}),
    (ExportFilter(min_area_share=0.3), {"a.mp4": ["002"], "b.mp4": [], "c.jpg": []}),  # null share: dropped
])
def test_filters_choose_items_and_masklets(handmade, tmp_path, filt, expected):
    out, _ = handmade
    record = export_run(out, "sav-png", tmp_path / "x", filt)
    assert kept(tmp_path / "x") == expected
    assert record["filter"] == filt.to_dict()
    assert record["counts"]["masklets"] == sum(len(v) for v in expected.values())


def test_filter_errors_name_the_fix(handmade, tmp_path):
    out, _ = handmade
    with pytest.raises(ExportFilterError, match="'nope.mp4' is not a done item"):
        export_run(out, "sav-json", tmp_path / "a", ExportFilter(items=("nope.mp4",)))
    with pytest.raises(ExportFilterError, match="no flag 'tiniest'"):
        ExportFilter(flags=("tiniest",))
    with pytest.raises(ExportFilterError, match="no review decisions yet.*drop --decision"):
        export_run(out, "sav-json", tmp_path / "b", ExportFilter(decision="accepted"))


def test_the_review_hook_feeds_decisions(handmade, tmp_path, monkeypatch):
    out, _ = handmade
    decisions = {"a.mp4/0": "accepted", "a.mp4/1": "rejected", "b.mp4/0": "accepted"}
    monkeypatch.setattr(filters, "review_decisions", lambda run: decisions)
    export_run(out, "sav-png", tmp_path / "acc", ExportFilter(decision="accepted"))
    assert kept(tmp_path / "acc") == {"a.mp4": ["000"], "b.mp4": ["000"], "c.jpg": []}
    export_run(out, "sav-png", tmp_path / "nr", ExportFilter(decision="not-rejected"))
    assert kept(tmp_path / "nr") == {"a.mp4": ["000", "002"], "b.mp4": ["000", "001"], "c.jpg": []}
    export_run(out, "sav-png", tmp_path / "default", ExportFilter())  # a reviewed run: rejected left out
    assert kept(tmp_path / "default") == kept(tmp_path / "nr")
    export_run(out, "sav-png", tmp_path / "all", ExportFilter(decision="all"))
    assert kept(tmp_path / "all") == {"a.mp4": ["000", "001", "002"], "b.mp4": ["000", "001"], "c.jpg": []}


def test_export_json_carries_the_run_and_the_random_weights_label(handmade, tmp_path):
    out, _ = handmade
    export_run(out, "davis-png", tmp_path / "d")
    record = json.loads((tmp_path / "d" / "export.json").read_text())
    assert record["random_weights"] is True and record["label"] == RANDOM_WEIGHTS_LABEL
    assert record["run"] == str(Path(out).resolve()) and record["format"] == "davis-png"
    assert record["fingerprint"] == json.loads((Path(out) / "run.json").read_text())["config_fingerprint"]
    assert "RANDOM WEIGHTS" in record["model"]
    assert record["counts"] == {"items": 3, "masklets": 5, "frames": 11, "items_without_masklets": 1}
    assert not (tmp_path / "d" / ".masklet-export" / "tmp").exists()


def test_another_export_into_the_same_dest_is_refused(handmade, tmp_path):
    out, _ = handmade
    export_run(out, "sav-json", tmp_path / "d")
    with pytest.raises(ExportError, match="holds another export.*format: 'sav-json'"):
        export_run(out, "sav-png", tmp_path / "d")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty and holds no masklet export"):
        export_run(out, "sav-json", tmp_path / "busy")
    again = export_run(out, "sav-json", tmp_path / "d")  # the same export again: already finished
    assert again["counts"]["items"] == 3


# A subprocess exports and kills itself with SIGKILL just before its N-th durable publish (staged item folders,
# done markers, the spec, the format's final files, export.json): every step a kill can interrupt.
KILLER = textwrap.dedent("""
    import os, signal, sys
    from pipeline.export import runner
    from pipeline.store import atomic
    out, fmt, dest, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    real = atomic.publish
    calls = [0]
    def publish(stage, final):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(stage, final)
    atomic.publish = runner.publish = publish
    runner.export_run(out, fmt, dest)
    print("publishes", calls[0])
""")


def _export_killed(out: str, fmt: str, dest: Path, kill_at: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", KILLER, out, fmt, str(dest), str(kill_at)], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("fmt", ["davis-png"])
def test_an_export_killed_at_any_publish_resumes_to_the_same_files(handmade, tmp_path, fmt):
    out, _ = handmade
    reference = tmp_path / "ref"
    done = _export_killed(out, fmt, reference, 0)
    assert done.returncode == 0, done.stderr
    publishes = int(done.stdout.split()[-1])
    assert publishes >= 8
    want = tree(reference)
    for kill_at in range(1, publishes + 1):
        dest = tmp_path / f"kill{kill_at}"
        killed = _export_killed(out, fmt, dest, kill_at)
        assert killed.returncode == -9, (kill_at, killed.stderr)
        export_run(out, fmt, dest)
        assert tree(dest) == want, f"killed before publish {kill_at}"
        assert not (dest / ".masklet-export" / "tmp").exists()


def test_dask_executor_equals_local(handmade, tmp_path):
    out, _ = handmade
    local = export_run(out, "sav-json", tmp_path / "local")
    dask = export_run(out, "sav-json", tmp_path / "dask", executor="dask", workers=2)
    assert tree(tmp_path / "local") == tree(tmp_path / "dask") and local == dask


def test_cli_exports_and_input_errors_exit_2(handmade, tmp_path, capsys):
    out, _ = handmade
    assert main(["export", out, "--format", "sav-json", "-o", str(tmp_path / "e"), "--no-flag", "tiny"]) == 0
    assert "exported" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "e").glob("*_auto.json")) == ["a.mp4_auto.json", "b.mp4_auto.json",
                                                                          "c.jpg_auto.json"]
    assert main(["export", out, "--format", "nope", "-o", str(tmp_path / "f")]) == 2
    assert "no export format 'nope'; the formats are" in capsys.readouterr().err
    assert main(["export", out, "--format", "sav-json", "-o", str(tmp_path / "g"), "--item", "zz.mp4"]) == 2
    assert "'zz.mp4' is not a done item" in capsys.readouterr().err
    assert main(["export", out, "--format", "sav-json", "-o", str(tmp_path / "h"), "--decision", "accepted"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no review decisions" in err


@needs_slurm_cluster
def test_slurm_array_tasks_export_the_same_files(handmade, tmp_path):
    out, _ = handmade
    local = export_run(out, "sav-png", tmp_path / "local")
    slurm = export_run(out, "sav-png", tmp_path / "slurm", executor="slurm", profile="local-test")
    assert tree(tmp_path / "local") == tree(tmp_path / "slurm") and local == slurm
    assert list((tmp_path / "slurm" / ".masklet-export" / "slurm").iterdir()), "submitit's files of the tasks"
