"""Per-machine speed settings: precision and memory format resolved from the hardware, CPU threads
shared among concurrent trainings, and the speed paths' numerics against the plain ones."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from semidiff import hardware
from semidiff.config import config_from_dict
from semidiff.engine.module import SemidiffModule
from semidiff.engine.threads import ThreadShare
from semidiff.methods import NetSpec, Progress, create_method

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- precision and memory format ----------------------------------------------------------------
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    with_bf16, without = tmp_path / "a", tmp_path / "b"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 avx2\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx2\nbugs\t\t: avx512_bf16\n")
    assert hardware.cpu_has_native_bf16(str(with_bf16)) is True
    assert hardware.cpu_has_native_bf16(str(without)) is False  # only the flags line counts
    assert hardware.cpu_has_native_bf16(str(tmp_path / "missing")) is False


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_follows_the_cpu(monkeypatch, native):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    assert hardware.resolve_precision("auto", "cpu") == ("bf16-mixed" if native else "32")
    for explicit in ("32", "bf16-mixed", "16-mixed"):
        assert hardware.resolve_precision(explicit, "cpu") == explicit


def test_memory_format_auto_is_channels_last_for_2d_mixed_precision_only():
    assert hardware.resolve_memory_format("auto", 2, "bf16-mixed") is torch.channels_last
    assert hardware.resolve_memory_format("auto", 2, "32") is None
    assert hardware.resolve_memory_format("auto", 3, "bf16-mixed") is None
    assert hardware.resolve_memory_format("channels_last", 3, "32") is torch.channels_last_3d
    assert hardware.resolve_memory_format("contiguous", 2, "bf16-mixed") is None


def _module(method="supervised", **train):
    cfg = {
        "data": {"reader": "synthetic", "root": "unused", "patch_size": [32, 32]},
        "model": {"net": "unet2d", "num_classes": 3, "net_options": {"features": [4, 8, 8, 16, 16]}},
        "method": {"name": method},
        "train": {"accelerator": "cpu", **train},
    }
    return SemidiffModule(config_from_dict(cfg, "test").model_dump(mode="json"))


def test_channels_last_puts_networks_and_batches_in_that_format_with_the_same_numbers():
    torch.manual_seed(0)
    plain = _module(memory_format="contiguous")
    fast = _module(memory_format="channels_last")
    fast.method.load_state_dict(plain.method.state_dict())
    for m in (plain, fast):
        m.setup("fit")
    convs = [p for p in fast.method.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert all(p.is_contiguous() for p in plain.method.parameters())
    labeled = {"image": torch.randn(2, 1, 32, 32), "label": torch.randint(0, 3, (2, 1, 32, 32))}
    batch = fast.on_after_batch_transfer({"labeled": dict(labeled), "unlabeled": None}, 0)
    assert batch["labeled"]["image"].is_contiguous(memory_format=torch.channels_last)
    # Dropout fills its masks in memory order, so the formats draw different masks: compare without
    # it. Same weights, same input: only the convolution kernels' summation order differs.
    plain.method.eval()
    fast.method.eval()
    loss_plain = plain.method.training_step(labeled, None, Progress(0, 10))["loss"]
    loss_fast = fast.method.training_step(batch["labeled"], None, Progress(0, 10))["loss"]
    assert torch.allclose(loss_plain, loss_fast, rtol=1e-5, atol=1e-6)
    loss_plain.backward()
    loss_fast.backward()
    for a, b in zip(plain.method.parameters(), fast.method.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-5)


# ---- threads -----------------------------------------------------------------------------------
def test_trainings_share_the_cores_and_dead_ones_are_forgotten(tmp_path, monkeypatch):
    monkeypatch.setattr("semidiff.engine.threads.available_cores", lambda: 4)
    torch.set_num_threads(4)
    share = ThreadShare(folder=tmp_path, log=lambda _: None)
    share.register()
    try:
        assert share.update() == 4  # alone: every core
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        (tmp_path / str(sleeper.pid)).touch()  # a second training on the machine
        (tmp_path / "999999999").touch()  # a training that died without unregistering
        assert share.update() == 2 and torch.get_num_threads() == 2
        assert not (tmp_path / "999999999").exists()
        sleeper.kill()
        sleeper.wait()
        assert share.update() == 4  # the other one ended: back to every core
    finally:
        share.unregister()
    assert not (tmp_path / str(os.getpid())).exists()
    assert torch.get_num_threads() == 4  # the process's own setting comes back


def test_share_reports_a_change_from_inside_a_lightning_fit(tmp_path, monkeypatch):
    """Lightning sets every callback's ``log`` to the module's metric logger: a second training that
    starts mid-fit must change the threads and be reported, not end the fit with a TypeError."""
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    monkeypatch.setattr("semidiff.engine.threads.available_cores", lambda: 4)
    torch.set_num_threads(4)
    messages: list[str] = []
    share = ThreadShare(folder=tmp_path, every=1, log=messages.append)
    share.register()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert share.update() == 4  # alone when training starts
        (tmp_path / str(sleeper.pid)).touch()  # then a second training starts
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=4)
        trainer = L.Trainer(max_steps=2, callbacks=[share], logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        trainer.fit(Tiny(), data)
        assert torch.get_num_threads() == 2
        assert messages == ["2 training(s) on 4 cores: 2 thread(s) for this one"]
    finally:
        sleeper.kill()
        sleeper.wait()
        share.unregister()


def test_share_never_exceeds_the_threads_the_process_was_given(tmp_path, monkeypatch):
    monkeypatch.setattr("semidiff.engine.threads.available_cores", lambda: 8)
    torch.set_num_threads(1)  # e.g. OMP_NUM_THREADS=1 or a caller's choice
    share = ThreadShare(folder=tmp_path, log=lambda _: None)
    share.register()
    try:
        assert share.update() == 1
    finally:
        share.unregister()


def test_fixed_threads_warn_when_the_machine_is_oversubscribed(tmp_path, monkeypatch):
    monkeypatch.setattr("semidiff.engine.threads.available_cores", lambda: 2)
    monkeypatch.setattr("semidiff.engine.threads.load_average", lambda: 0.0)  # only the registry's warning
    share = ThreadShare(fixed=2, folder=tmp_path, log=lambda _: None)
    share.register()
    (tmp_path / str(os.getppid())).touch()  # the parent process stands in for another training
    try:
        with pytest.warns(UserWarning, match="more threads than cores"):
            assert share.update() == 2
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            share.update()  # said once
    finally:
        share.unregister()


def test_a_busy_machine_is_warned_about_once_and_the_threads_do_not_follow_the_load(tmp_path, monkeypatch):
    """Another program's threads (not in the registry) show in the load average: a warning, same threads."""
    monkeypatch.setattr("semidiff.engine.threads.available_cores", lambda: 2)
    torch.set_num_threads(2)
    load = {"value": 2.0}
    monkeypatch.setattr("semidiff.engine.threads.load_average", lambda: load["value"])
    share = ThreadShare(folder=tmp_path, log=lambda _: None)
    share.register()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert share.update() == 2  # load 2 on 2 cores: this training's own threads
        load["value"] = 4.2  # another program runs 2 threads beside it
        with pytest.warns(UserWarning, match="load average is 4.2 on 2 cores"):
            assert share.update() == 2
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert share.update() == 2  # said once
    finally:
        share.unregister()
    monkeypatch.setattr("semidiff.engine.threads.load_average", lambda: None)  # no load average (not POSIX)
    _assert_quiet_update(ThreadShare(folder=tmp_path, log=lambda _: None), threads=2)
    monkeypatch.setattr("semidiff.engine.threads.load_average", lambda: 4.2)
    _assert_quiet_update(ThreadShare(folder=tmp_path, log=lambda _: None, loader_workers=2), threads=2)  # its own workers


def _assert_quiet_update(share: ThreadShare, threads: int) -> None:
    """Register ``share``, check that an update sets ``threads`` without any warning, unregister."""
    share.register()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert share.update() == threads
    finally:
        share.unregister()


# ---- method speed paths ------------------------------------------------------------------------
def test_ua_mt_batched_teacher_passes_match_one_by_one():
    """Noisy teacher passes stacked per forward (the default, and all T+1 at once) against one pass
    per forward: the noise draws are the same, so with the teacher's dropout and batch statistics
    out of the way (eval mode) target and mask agree."""
    spec = NetSpec("unet2d", 1, 3, 2, {"features": [4, 8, 8, 16, 16]})
    torch.manual_seed(0)
    single = create_method("ua_mt", spec, {"mc_passes": 4, "mc_batch": 1})
    x_u = torch.rand(3, 1, 32, 32)
    logits = torch.randn(3, 3, 32, 32)
    progress = Progress(50, 100)
    single.teacher.eval()  # dropout off, so the comparison isolates the batching
    torch.manual_seed(2)
    loss_s, parts_s = single.consistency_loss(logits, x_u, progress)
    for batch in (None, 3):  # all five passes in one forward; the default, 3 then 2
        batched = create_method("ua_mt", spec, {"mc_passes": 4, "mc_batch": batch})
        batched.load_state_dict(single.state_dict())
        batched.teacher.eval()
        torch.manual_seed(2)
        loss_b, parts_b = batched.consistency_loss(logits, x_u, progress)
        assert torch.allclose(loss_b, loss_s, rtol=1e-4, atol=1e-6)
        assert torch.equal(parts_b["mask_ratio"], parts_s["mask_ratio"])


def test_compile_compiles_every_network_in_place_keeping_checkpoint_keys(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    module = _module("mean_teacher", compile=True)
    keys = set(module.state_dict())
    module.setup("fit")
    assert {id(m) for m in compiled} == {id(module.method.student), id(module.method.teacher)}
    assert set(module.state_dict()) == keys
