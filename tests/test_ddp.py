"""Several processes: DDP through torchrun on CPU (gloo), compared with one process doing the same global batch."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TINY, WEIGHTS, compose_config, needs_weights
from sagan.checkpoint import load_checkpoint
from sagan.cli import parse_args
from sagan.config import check_config
from sagan.evaluation.evaluate import evaluate
from sagan.evaluation.request import FidArgs
from sagan.utils.processes import rank_part, rank_seed
from sagan.evaluation.sampling import draw
from sagan.models import build_models
from sagan.training.sync_batchnorm import SyncBatchNorm2d, use_sync_batchnorm
from sagan.training.loop import train
from sagan.utils.errors import UserError

TESTS = Path(__file__).parent
# Small and short: 4 steps of the tiny model, checkpoints at 2 and 4, in fp32 (bf16 rounding would hide the comparison).
RUN = [*TINY, "train.steps=4", "train.ckpt_every=2", "data.num_workers=0", "perf.precision=fp32"]


def torchrun(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `args` on 2 processes through torchrun; fails the test, with the workers' output, unless all exit 0."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def train_two_processes(tmp_path: Path, *overrides: str, name: str = "ddp") -> Path:
    """`sagan-train` on 2 processes, run from `tmp_path`; returns the run directory, tmp_path / name."""
    torchrun("-m", "sagan.train", *RUN, *overrides, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
    return tmp_path / name


def trainer_state(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["trainer"]


def max_difference(a: dict, b: dict, keys) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in keys)


def assert_trained_alike(a: dict, b: dict) -> None:
    """Two trainer states from the same data, latents and batch statistics agree up to float rounding.

    D entirely, to 1e-5. G's weights to 1e-4; G's biases feed BatchNorms, which cancel them, so their gradients are
    rounding noise that Adam scales up to steps of about the learning rate (2e-4): those agree to 2e-3 over 4 steps.
    BatchNorm running statistics are left out (accumulation updates them once per micro-batch).
    """
    assert max_difference(a["D"], b["D"], a["D"]) < 1e-5
    for net in ("G", "G_ema"):
        weights = [k for k in a[net] if k.endswith(("weight.original", "gamma"))]
        learned = [k for k in a[net] if "running_" not in k and "num_batches_tracked" not in k]
        assert max_difference(a[net], b[net], weights) < 1e-4, net
        assert max_difference(a[net], b[net], learned) < 2e-3, net


@pytest.mark.slow
def test_ranks_hold_identical_networks_after_every_step():
    # Different initial weights per rank, conditional model, 2 micro-batches: DDP must make and keep them identical,
    # with G's BatchNorm statistics and the spectral-norm vectors resynchronised every step.
    result = torchrun(str(TESTS / "ddp_worker.py"), "3", "2", cwd=TESTS)
    assert "rank 0: ok after 3 steps" in result.stdout and "rank 1: ok after 3 steps" in result.stdout


@pytest.mark.slow
def test_compiled_networks_train_on_two_processes():
    # perf.compile=true under torchrun: DDP over the compiled G and D (a minute of compilation on 2 CPU cores).
    result = torchrun(str(TESTS / "ddp_worker.py"), "2", "1", "compile", cwd=TESTS)
    assert "rank 0: ok after 2 steps" in result.stdout and "rank 1: ok after 2 steps" in result.stdout


@pytest.mark.slow
def test_two_processes_match_one_and_resume_on_one(tmp_path):
    # 2 processes x 4 images = 1 process x 2 micro-batches of 4: the same images, latents and BatchNorm batches, so the
    # results agree up to float rounding (different summation order).
    ddp = train_two_processes(tmp_path, "model.conditional=true")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # rank 1 wrote no run directory of its own
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["last.pt", "step_0000002.pt", "step_0000004.pt"]
    assert (ddp / "train.log").read_text().count("run directory:") == 1  # one log, rank 0's

    single = compose_config(*RUN, "model.conditional=true", "train.grad_accum=2")
    train(single, tmp_path / "single")
    assert_trained_alike(trainer_state(ddp), trainer_state(tmp_path / "single"))

    # The 2-process checkpoint at step 2, continued by one process, ends where the 1-process run ended.
    resumed = compose_config(*RUN, "model.conditional=true", "train.grad_accum=2", f"train.resume={ddp / 'checkpoints' / 'step_0000002.pt'}")
    assert train(resumed, tmp_path / "resumed")["step"] == 4
    assert_trained_alike(trainer_state(tmp_path / "resumed"), trainer_state(tmp_path / "single"))



@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    """The 2-process run the tests below share: the tiny run, each process normalising by its own share of the batch,
    with FID at steps 2 and 4 where the Inception weights are here (evaluation draws from its own seeded streams, so
    it leaves the training as it is)."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    evaluation = ["eval.every=2", "eval.num_samples=10", "eval.ref_images=10", "eval.isc=false",
                  f"metrics.inception_weights={WEIGHTS}", f"metrics.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    return train_two_processes(tmp_path, *(evaluation if WEIGHTS else []), name="plain")


@pytest.mark.slow
def test_sync_batchnorm_two_processes_match_one_process(tmp_path, plain_run):
    ddp = train_two_processes(tmp_path, "dist.sync_bn=true")
    train(compose_config(*RUN, "dist.sync_bn=true"), tmp_path / "single")
    single = trainer_state(tmp_path / "single")
    assert_trained_alike(trainer_state(ddp), single)
    # Without SyncBatchNorm each process normalises by its own half of the batch: far from the 1-process result.
    plain = trainer_state(plain_run)
    assert max_difference(plain["D"], single["D"], plain["D"]) > 1e-3


@pytest.mark.slow
def test_studiogans_step_on_two_processes_matches_one_process(tmp_path):
    # experiment=cifar10_studiogan's network and step (two D calls per D step, D's power iteration in the G step, G's
    # BatchNorm statistics left alone in the D step) under DDP, with the global batch's BatchNorm statistics.
    studio = ["model=studiogan32", "optim.d_calls=2", "optim.d_sn_in_g_step=true", "optim.g_bn_stats_in_d_step=false",
              "dist.sync_bn=true", "model.conditional=true"]  # fmt: skip
    ddp = train_two_processes(tmp_path, *studio)
    train(compose_config(*RUN, *studio), tmp_path / "single")
    assert_trained_alike(trainer_state(ddp), trainer_state(tmp_path / "single"))


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_with_a_checkpoint(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sagan.train"]
    command += [*TINY, "train.steps=100000", "data.num_workers=0", f"hydra.run.dir={tmp_path / 'run'}"]
    launcher = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in launcher.stdout:
        output.append(line)
        if "step 3/100000" in line:
            break
    os.kill(worker_pid(launcher.pid, rank=1), signal.SIGUSR1)
    output += launcher.stdout.readlines()
    assert launcher.wait(timeout=120) == 0, "".join(output)[-3000:]
    text = "".join(output)
    assert "stopped by a signal to another rank" in text  # rank 0 did not get it, and stopped too
    step = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["trainer"]["step"]
    assert 3 <= step < 100000


def worker_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker process of `rank` (Linux /proc)."""
    for _ in range(100):
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                environ = (proc / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == launcher and f"RANK={rank}".encode() in environ:
                return int(proc.name)
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} worker under pid {launcher}")


@pytest.mark.slow
@needs_weights
def test_evaluation_during_a_two_process_run(plain_run):
    ddp = plain_run
    lines = [line for line in (ddp / "metrics.jsonl").read_text().splitlines() if "metrics/fid" in line]
    assert len(lines) == 2  # steps 2 and 4, logged once (by rank 0)
    assert (ddp / "checkpoints" / "best.pt").is_file()


@pytest.mark.slow
@needs_weights
def test_two_process_evaluation_equals_one_process(tmp_path):
    """`sagan-fid` under torchrun (each rank generates its part and runs Inception on it; features are gathered)
    gives the FID and KID of one process evaluating the same checkpoint."""
    train(compose_config(*RUN, "train.steps=1", "model.conditional=true"), tmp_path / "run")
    args = [f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.pt'}", "ref=train", "n=21", "ref_n=15", "isc=false", "kid=true",
            f"metrics.inception_weights={WEIGHTS}", "device=cpu"]  # fmt: skip
    # Separate caches: both compute their reference features (the two processes each half of them, gathered).
    torchrun("-m", "sagan.fid", *args, f"metrics.cache_dir={tmp_path / 'two'}", f"out={tmp_path / 'two.json'}", cwd=tmp_path)
    two = json.loads((tmp_path / "two.json").read_text())
    one = evaluate(parse_args(FidArgs, [*args, f"metrics.cache_dir={tmp_path / 'one'}", f"out={tmp_path / 'one.json'}"]))
    assert not one["reference_cached"] and not two["reference_cached"]
    for key in ("fid", "kid"):
        assert abs(two["metrics"][key] - one["metrics"][key]) < 1e-4 * max(1.0, abs(one["metrics"][key])), key


def test_parts_of_ranks_add_up_to_the_samples_of_one_process():
    G, _ = build_models(compose_config(*TINY, "model.conditional=true").model, num_classes=3)
    G.eval()
    alone, labels = draw(G, 7, seed=3, batch=2)
    parts = [rank_part(7, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [3, 2, 2] and parts[0].start == 0 and parts[-1].stop == 7
    shares = [draw(G, 7, seed=3, batch=2, part=p) for p in parts]
    assert torch.equal(torch.cat([images for images, _ in shares]), alone)
    assert torch.equal(torch.cat([y for _, y in shares]), labels)


def test_global_batch_must_split_over_processes_and_micro_batches():
    with pytest.raises(UserError, match=r"train.batch_size=8 does not split into 3 processes x 1 micro-batches.*multiple of 3"):
        check_config(compose_config(*TINY), world_size=3)
    with pytest.raises(UserError, match=r"into 2 processes x 3 micro-batches.*multiple of 6"):
        check_config(compose_config(*TINY, "train.grad_accum=3"), world_size=2)
    check_config(compose_config(*TINY, "train.grad_accum=2"), world_size=2)  # 8 = 2 x 2 x 2


def test_sync_batchnorm_replaces_every_batchnorm_and_keeps_its_state():
    G, _ = build_models(compose_config(*TINY).model, num_classes=0)
    G.train()
    G(torch.randn(4, 128), None)  # non-trivial running statistics
    before = {k: v.clone() for k, v in G.state_dict().items()}
    n_bn = sum(type(m) is nn.BatchNorm2d for m in G.modules())
    use_sync_batchnorm(G)
    assert n_bn > 0 and sum(type(m) is nn.BatchNorm2d for m in G.modules()) == 0
    assert sum(isinstance(m, SyncBatchNorm2d) for m in G.modules()) == n_bn
    assert all(torch.equal(before[k], v) for k, v in G.state_dict().items())
    # With one process it is an ordinary BatchNorm2d.
    bn, sync = nn.BatchNorm2d(3), SyncBatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(bn(x), sync(x)) and torch.equal(bn.running_var, sync.running_var)


def test_rank_seeds_differ_and_rank_zero_keeps_the_run_seed():
    assert rank_seed(7, 0) == 7
    assert len({rank_seed(7, r) for r in range(8)}) == 8
