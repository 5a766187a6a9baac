"""The `attribute` command: exact answers, JSON shape, and one-line errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.cli import main

POWER = "time_s,gpu,power_w\n0,0,100\n10,0,100\n"
REQUESTS = "id,model,start_s,end_s\na,llama,2,6\n"


def write(tmp_path: Path, power: str, requests: str) -> tuple[Path, Path]:
    p, r = tmp_path / "power.csv", tmp_path / "requests.csv"
    p.write_text(power)
    r.write_text(requests)
    return p, r


def test_hand_computed_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A lone request on a flat 100 W line with a 60 W baseline gets 160 J dynamic and 240 J idle."""
    p, r = write(tmp_path, POWER, REQUESTS)
    assert (
        main(
            [
                "attribute",
                "--power",
                str(p),
                "--requests",
                str(r),
                "--idle-watts",
                "60",
                "--carbon-intensity",
                "360",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["energy_joules"] == pytest.approx(
        {"total": 1000.0, "dynamic": 160.0, "idle_serving": 240.0, "idle_standby": 600.0}
    )
    assert out["idle_baseline_watts"] == 60.0
    assert out["emissions_grams"] == pytest.approx(0.1)
    assert out["requests"] == [
        {
            "id": "a",
            "model": "llama",
            "dynamic_joules": pytest.approx(160.0),
            "idle_joules": pytest.approx(240.0),
            "energy_joules": pytest.approx(400.0),
            # no first token and no output tokens recorded: all of it counts as prefill
            "prefill_joules": pytest.approx(400.0),
            "decode_joules": pytest.approx(0.0),
        }
    ]


def test_energy_counter_reconciles_power(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With an energy_j column the total follows the counter, not the integrated readings."""
    rows = ["time_s,gpu,power_w,energy_j"] + [f"{t},0,100,{1000 + 130 * t}" for t in range(11)]
    p, r = write(tmp_path, "\n".join(rows) + "\n", REQUESTS)
    assert main(["attribute", "--power", str(p), "--requests", str(r), "--idle-watts", "60"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["energy_joules"]["total"] == pytest.approx(1300.0)


def test_idle_watts_per_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A list of idle watts is one per GPU in order of appearance; the total is reported."""
    power = "time_s,gpu,power_w\n0,0,100\n0,1,100\n10,0,100\n10,1,100\n"
    p, r = write(tmp_path, power, REQUESTS)
    assert (
        main(["attribute", "--power", str(p), "--requests", str(r), "--idle-watts", "60,20"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["idle_baseline_watts"] == 80.0
    assert out["requests"][0]["dynamic_joules"] == pytest.approx(160.0 + 320.0)


@pytest.mark.parametrize(
    ("power", "requests", "expected"),
    [
        (
            "time_s,gpu\n0,0\n",
            REQUESTS,
            "power.csv: line 1, column power_w: missing from the header",
        ),
        (
            "time_s,gpu,power_w\n0,0,abc\n",
            REQUESTS,
            "power.csv: line 2, column power_w: 'abc' is not a number",
        ),
        ("", REQUESTS, "power.csv: empty file"),
        ("time_s,gpu,power_w\n", REQUESTS, "power.csv: no data rows"),
        (
            POWER,
            "id,model,start_s,end_s\na,m,5,4\n",
            "requests.csv: line 2, column end_s: 4.0 is before start_s 5.0",
        ),
        (
            POWER,
            "id,model,start_s,end_s,status\na,m,1,4,weird\n",
            "requests.csv: line 2, column status:",
        ),
        (POWER, "id,model,start_s\na,m,1\n", "requests.csv: line 1, column end_s: missing"),
        (
            POWER,
            "id,model,start_s,end_s\na,m,1,2\na,m,2,3\n",
            "requests.csv: line 3, column id: 'a' appears twice",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, power: str, requests: str, expected: str
) -> None:
    """Bad input exits 2 naming file, line and column, with no traceback."""
    p, r = write(tmp_path, power, requests)
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "attribute", "--power", str(p), "--requests", str(r)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr


def test_idle_watts_count_mismatch_is_a_usage_error(tmp_path: Path) -> None:
    """Three idle values for one GPU is refused with a line naming the flag."""
    p, r = write(tmp_path, POWER, REQUESTS)
    with pytest.raises(SystemExit) as exc:
        main(["attribute", "--power", str(p), "--requests", str(r), "--idle-watts", "1,2,3"])
    assert exc.value.code == 2


def test_bundled_sample_trace_attributes(capsys: pytest.CaptureFixture[str]) -> None:
    """The sample trace shipped for the README conserves energy across requests and standby."""
    root = Path(__file__).resolve().parents[1] / "examples" / "trace"
    assert (
        main(
            [
                "attribute",
                "--power",
                str(root / "power.csv"),
                "--requests",
                str(root / "requests.csv"),
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    e = out["energy_joules"]
    assert e["total"] > 0
    assert len(out["requests"]) > 10
    attributed = sum(r["energy_joules"] for r in out["requests"])
    assert attributed + e["idle_standby"] == pytest.approx(e["total"], rel=1e-6)
