"""What only a GPU runs, checked on the CPU as far as PyTorch allows (docs/gpu.md lists every such path and where it
is checked): forwards on CUDA tensors (PyTorch's fake tensors, which hold a device but no data, and refuse a CPU
tensor mixed in), checkpoints written on a GPU resumed on a CPU, labels out of range, fused Adam across a resume, the
process group left on every exit."""

import copy
import gc
import io
import zipfile

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import TRAINED, compose_config
from sagan.checkpoint import load_checkpoint, load_network, serialize
from sagan.evaluation.sampling import draw
from sagan.models import build_models
from sagan.training import loop
from sagan.training.diffaugment import DiffAugment
from sagan.training.ema import EmaGenerator
from sagan.training.step import Trainer
from sagan.utils.errors import UserError
from sagan.utils.processes import World, set_rng_state
from sagan.visualization.figures import capture_attention_inputs

CUDA = torch.device("cuda", 0)
# What torch.cuda.get_rng_state() and a CUDA torch.Generator's get_state() return: a Philox seed and offset, 16 bytes.
CUDA_RNG_STATE = torch.arange(16, dtype=torch.uint8)


def tiny_model(conditional: bool = True, device: torch.device | None = None):
    """The tiny demo G and D (3 classes when conditional), built on `device` (PyTorch's default device otherwise)."""
    model = compose_config("experiment=demo", "model.g_ch=4", "model.d_ch=4").model
    with device or torch.device("cpu"):
        return build_models(model, 3 if conditional else 0)


@pytest.fixture
def fake_tensors():
    """Garbage collected before and after a test that makes fake tensors: PyTorch (2.14) crashes in a collection that
    finds the fake-tensor cycles of two such tests (or of torch.compile's) at once."""
    gc.collect()
    yield
    gc.collect()


def test_g_d_g_ema_and_the_sampler_on_cuda_tensors_mix_in_no_cpu_tensor(fake_tensors):
    """G and D built on (fake) cuda:0, trained-mode and eval-mode forwards, the attention maps the figures read,
    G_ema's update, and the sampler that moves its CPU latents to G's device: a CPU tensor meeting a GPU one anywhere
    in these raises FakeTensorDeviceMismatchError. (Standing statistics cannot run here: PyTorch's BatchNorm with
    momentum=None reads its batch counter on the host, which a fake tensor cannot answer; the GPU tier runs them.)"""
    with FakeTensorMode(allow_non_fake_inputs=True):
        G, D = tiny_model(conditional=False, device=CUDA)
        z = torch.randn(4, G.z_dim, device=CUDA)
        for training in (True, False):
            G.train(training), D.train(training)
            images = G(z)
            assert images.device == D(images).device == CUDA
        maps = capture_attention_inputs(G, lambda: G(z))
        assert maps and all(x.device == CUDA for x in maps.values())
        ema = EmaGenerator(G, decay=0.999, start=0, bn="copy", bn_batches=2, bn_batch_size=4, seed=0)
        ema.update(G, step=1)
        images, _ = draw(ema.ready(step=1), 6, seed=0, batch=4)
        assert images.device.type == "cpu" and images.shape == (6, 3, 32, 32)  # drawn on the GPU, returned on the CPU


def test_conditional_networks_read_gpu_labels_in_eval_mode_only(fake_tensors):
    """In training mode G and D take labels on the GPU as they are (no host sync per step); in eval mode they read
    them to check their range, which fake tensors, holding no values, cannot answer."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    with FakeTensorMode(allow_non_fake_inputs=True):
        G, D = tiny_model(conditional=True, device=CUDA)
        z, y = torch.randn(4, G.z_dim, device=CUDA), torch.randint(3, (4,), device=CUDA)
        images = G(z, y)
        assert D(images, y).device == CUDA
        for net, args in ((G, (z, y)), (D, (images, y))):
            with pytest.raises(DataDependentOutputException):
                net.eval()(*args)


def written_on_a_gpu(data: bytes) -> bytes:
    """torch.save's bytes with every tensor stored on cuda:0, as a GPU run writes them (the storages' location in the
    archive's pickle, protocol 2, rewritten from 'cpu')."""
    source, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            member = source.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in member, "torch.save's pickle changed: update this helper"
                member = member.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            target.writestr(info, member)
    return out.getvalue()


def test_a_checkpoint_written_on_a_gpu_resumes_on_the_cpu(trained, tmp_path, caplog):
    """A GPU run's checkpoint: tensors on cuda:0, and CUDA RNG states (its latent generator, the global CUDA state).
    Every load maps to the CPU; each CUDA stream becomes a new seeded one, with a warning, and training continues."""
    state = load_checkpoint(trained["cond"])
    state["trainer"].update(rng=CUDA_RNG_STATE, rng_device="cuda")
    state["rng"]["cuda"] = CUDA_RNG_STATE
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(written_on_a_gpu(serialize({k: v for k, v in state.items() if k != "format"})))
    with pytest.raises(RuntimeError, match="CUDA"):  # the file really holds GPU tensors
        torch.load(ckpt, weights_only=True)
    assert load_network(ckpt, "G_ema").num_classes == 3  # sagan.load
    cfg = compose_config(*TRAINED["cond"], "device=cpu", "train.steps=3", "train.resume=auto")
    with caplog.at_level("WARNING", logger="sagan"):
        result = loop.train(cfg, tmp_path / "run")
    assert result["step"] == 3
    assert "checkpoint was written on cuda, this run is on cpu" in caplog.text
    with torch.random.fork_rng(devices=[]):  # this process's generator is set back after the test
        set_rng_state(state["rng"])  # the CUDA state is left alone where there is no GPU


def test_diffaugment_continues_a_gpu_stream_on_the_cpu_with_a_seeded_one():
    augment = DiffAugment(["translation"], device=torch.device("cpu"), seed=3)
    augment.load_state_dict({"rng": CUDA_RNG_STATE, "device": "cuda"}, step=7)
    expected = torch.Generator().manual_seed(augment.seed * 1_000_003 + 7)
    assert torch.equal(augment.rng.get_state(), expected.get_state())


@pytest.mark.parametrize("training", [True, False])
def test_labels_out_of_range_are_one_line_not_an_index_error(training):
    """On a GPU an embedding index out of range is a device-side assert that names nothing; the check runs before,
    on the CPU always and on a GPU for eval-mode networks (the GPU tier runs that half)."""
    G, D = tiny_model()
    G.train(training), D.train(training)
    z = torch.randn(2, G.z_dim)
    with pytest.raises(UserError, match=r"labels must lie in \[0, 3\), got values from 1 to 3"):
        G(z, torch.tensor([1, 3]))
    with pytest.raises(UserError, match=r"labels must lie in \[0, 3\), got values from -1 to 0"):
        D(torch.zeros(2, 3, 32, 32), torch.tensor([-1, 0]))


@pytest.mark.parametrize("fused_before, fused_after", [(True, False), (False, True)])
def test_resume_switches_fused_adam_either_way(fused_before, fused_after):
    """Fused Adam (perf.fused_adam, on by default on a GPU) keeps its step counters as tensors: a checkpoint moves
    between fused and unfused Adam. PyTorch's CPU fused Adam runs the same loading code as its CUDA one."""
    batches = iter([(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.zeros(4, dtype=torch.long))] * 3)
    before = Trainer(*tiny_model(False), fused_adam=fused_before)
    before.train_step(batches)
    after = Trainer(*tiny_model(False), fused_adam=fused_after)
    after.load_state_dict(copy.deepcopy(before.state_dict()))
    assert all(bool(g["fused"]) == fused_after for g in after.opt.g.param_groups + after.opt.d.param_groups)
    after.train_step(batches)
    assert after.step == 2 and after.nonfinite() is None


@pytest.mark.parametrize("fails", [False, True])
def test_the_process_group_is_left_on_every_exit(fails, monkeypatch, tmp_path):
    """train() leaves the process group when the run ends and when it fails: a group left for the interpreter's exit
    can abort the process (gloo) or leave NCCL's communicators behind."""
    world = World(rank=0, local_rank=0, size=2)
    left = []
    monkeypatch.setattr(loop, "init_distributed", lambda device, timeout_min: (world, torch.device("cpu")))
    monkeypatch.setattr(loop, "broadcast_object", lambda obj, w: obj)
    monkeypatch.setattr(loop, "leave_distributed", left.append)

    def body(cfg, run_dir, world, device):
        if fails:
            raise UserError("the run failed")
        return {"step": 0}

    monkeypatch.setattr(loop, "train_in", body)
    cfg = compose_config("experiment=demo", "train.batch_size=8")
    if fails:
        with pytest.raises(UserError):
            loop.train(cfg, tmp_path)
    else:
        loop.train(cfg, tmp_path)
    assert left == [world]
