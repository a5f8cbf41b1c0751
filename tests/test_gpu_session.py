"""The prepared GPU session rehearsed on this CPU (`bash scripts/gpu_check.sh --rehearse`): the same phases and code
as on a lent GPU at tiny sizes, on a CIFAR-10-shaped zip the test makes, then the command that turns what came back
into the FID table and plot beside StudioGAN's log. So that the session works the first time it gets a GPU."""

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from xml.etree import ElementTree
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).parents[1]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar_like_zip(path: Path, per_class: int = 8) -> Path:
    """CIFAR-10's layout (<class>/<NNNN>.jpg, 32x32 JPEGs), random pixels."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as z:
        for c, name in enumerate(CLASSES):
            for i in range(per_class):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="JPEG")
                z.writestr(f"{name}/{i:04d}.jpg", buffer.getvalue())
    return path


@pytest.mark.slow
def test_the_gpu_session_rehearsed_on_the_cpu_brings_back_what_the_fid_table_needs(tmp_path):
    data = cifar_like_zip(tmp_path / "cifar.zip")
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out)}
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--rehearse", "--data", str(data),
                             "--work", str(work)], capture_output=True, text=True, env=env, timeout=1200)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # What comes back: snapshot parts and one archive, within the device tool's limits (8 files, 16 MiB each).
    files = sorted(p.name for p in out.iterdir())
    assert files == ["G_ema_step000002.pt.part0", "G_ema_step000004.pt.part0", "session.tar.gz"], files
    assert all((out / f).stat().st_size < 16 * 2**20 for f in files)
    with tarfile.open(out / "session.tar.gz") as tar:
        names = set(tar.getnames())
        read = lambda name: tar.extractfile(name).read().decode()  # noqa: E731
        tier = ElementTree.fromstring(read("gpu_tier.xml")).find("testsuite")
        benchmarks = {p: json.loads(read(f"benchmark_{p}.json")) for p in ("sagan32", "sagan128")}
        run_log, run_config = read("cifar10_run/train.log"), read("cifar10_run/config.yaml")
    assert {"cifar10_run/metrics.jsonl", "cifar10_run/samples/step_0000004.png", "session.json"} <= names
    assert "step 4/4" in run_log and "10 classes" in run_log  # the whole run, on the ten classes of the zip
    assert "name: studiogan32" in run_config and "d_calls: 2" in run_config  # StudioGAN's network and step
    # The tier ran each command's command-line test on the CPU, and none failed or errored.
    assert (tier.get("failures"), tier.get("errors")) == ("0", "0"), ElementTree.tostring(tier)[-3000:]
    passed = {case.get("name") for case in tier.iter("testcase") if len(case) == 0}  # no skipped/failure/error child
    for command in ("train", "sample", "attention", "export", "fid"):
        assert any(name.startswith(f"test_sagan_{command}_") for name in passed), (command, sorted(passed))
    for preset, bench in benchmarks.items():
        assert {r["variant"] for r in bench["step"]} == {"plain", "default"}  # compile: the GPU session only
        assert all("error" not in r and r["steps_per_s"] > 0 for r in bench["step"]), bench["step"]
        assert {r["variant"] for r in bench["attention"]} == {"explicit", "ours"}

    # Then, on a CPU: the table and the plot beside (a log in the format of) StudioGAN's.
    weights = os.environ.get("SAGAN_FID_WEIGHTS")
    if not weights:
        pytest.skip("the FID table needs the offline FID Inception weights (SAGAN_FID_WEIGHTS)")
    log = tmp_path / "studiogan.log"
    log.write_text("[INFO] > FID score (Step: 2, Using test moments): 48.889\n"
                   "[INFO] > FID score (Step: 4, Using test moments): 37.715\n")  # fmt: skip
    curve = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "studiogan_curve.py"), "--snapshots", str(out), "--ref", str(data),
         "--log", str(log), "--weights", weights, "--n", "16", "--ref-n", "16", "--device", "cpu", "--out", str(tmp_path / "curve.png")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert curve.returncode == 0, curve.stdout[-3000:] + curve.stderr[-3000:]
    figures = json.loads((tmp_path / "curve.json").read_text())
    assert [(r["step"], r["studiogan"]) for r in figures["rows"]] == [(2, 48.889), (4, 37.715)]
    assert all(r["sagan"] > 0 for r in figures["rows"]) and (tmp_path / "curve.png").stat().st_size > 0
    assert "| 2 | " in curve.stdout and "| 48.9 |" in curve.stdout
