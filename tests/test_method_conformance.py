"""The conformance suite: every registered method honours the Method contract.

Parametrised over the method registry when the tests are collected, never over a list of names:
a method gets every check below by being registered (docs/contributing.md). The checks are plain
functions, so ``test_a_toy_fixmatch_gets_every_check_by_registering`` runs them on a method defined
in this file only, and the ``*_can_fail`` tests show that each check catches what it is for.

All on tiny networks and 32x32 (2D) / 32x32x16 (3D) synthetic batches, one torch thread.
"""

from __future__ import annotations

import contextlib
import copy
import re
from typing import ClassVar

import pytest
import torch
import yaml
from pydantic import field_validator
from torch import Tensor

from semidiff.config import NoiseConfig
from semidiff.data.readers import READERS
from semidiff.data.record import IGNORE_INDEX
from semidiff.data.transforms import block_mask, cutmix, intensity_jitter, random_blur
from semidiff.errors import ConfigError
from semidiff.methods import (
    METHODS,
    Method,
    MethodOptions,
    NetSpec,
    Progress,
    create_method,
    list_methods,
    method_class,
    method_options,
    register_method,
)
from semidiff.methods.common import build_net, require_unlabeled, softmax_probs
from semidiff.methods.losses import seg_loss
from semidiff.nets import list_nets

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_CLASSES = 3
MAX_STEPS = 4
#: The names of supervised terms in a training step's parts (Diff-CL: loss_c_sup, loss_d_sup).
SUPERVISED_PART = re.compile(r"loss(_\w+)?_sup")
#: Steps before the checkpoint of the resume check: odd, so FIFO pointers and the like are not back
#: at 0, and at the switch from BCP's pre-training and ProtoDiff's warm-up (FAST_OPTIONS).
RESUME_AT = 1
SHAPES = {2: (32, 32), 3: (32, 32, 16)}  # BCP halves the batch: the bottleneck keeps >1 value
#: Small options per network, for speed; a network not named here is built with its defaults.
TINY_NETS = {
    "unet2d": {"features": [4, 8, 8, 8, 8]},
    "vnet": {"n_filters": 4},
    "unet3d": {"features": [4, 8, 8, 8, 8]},
    "protodiff_net": {"features": [4, 8, 8, 8, 8], "time_embed_dim": 8},
    "protodiff_unet": {"time_embed_dim": 8},
}
#: Options that only make a method faster here (or reach its unlabeled terms within MAX_STEPS);
#: a method not named here is checked with its defaults, which is what a new method gets.
FAST_OPTIONS = {
    "diffcl": {"timesteps": 20, "test_steps": 2, "pl_steps": 1, "hfm_dim": 8, "hfm_d_state": 4, "proj_hidden": 8,
               "proj_dim": 8, "bank_size": 8, "bank_push": 4, "contrast_voxels": 64, "ds_time_dim": 8},
    "ua_mt": {"mc_passes": 2},
    "bcp": {"pretrain_steps": 1},
    "protodiff": {"warmup": 1, "sampling_steps": 2, "pixels_per_class": 32},
}


def registered_methods() -> list[str]:
    """The names the suite is parametrised over: the registry, read when the tests are collected."""
    return list_methods()


# ---- building a method and stepping it like the engine ------------------------------------------
def tiny_method(name: str, dims: int = 2, seed: int = 0) -> Method:
    """The registered method ``name`` on a tiny network (its first supported one, else unet2d/vnet)."""
    torch.manual_seed(seed)
    nets = method_class(name).supported_nets or (("unet2d",) if dims == 2 else ("vnet",))
    spec = NetSpec(nets[0], 1, NUM_CLASSES, dims, copy.deepcopy(TINY_NETS.get(nets[0], {})))
    return create_method(name, spec, dict(FAST_OPTIONS.get(name, {})))


def batch(dims: int = 2, seed: int = 0) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = SHAPES[dims]
    label = torch.randint(0, NUM_CLASSES, (2, 1, *shape), generator=g)
    image = label.float() / NUM_CLASSES + 0.1 * torch.randn(2, 1, *shape, generator=g)
    return {"image": image, "label": label}, {"image": torch.randn(2, 1, *shape, generator=g)}


def optimiser(method: Method) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2)


def engine_step(method: Method, opt: torch.optim.Optimizer, step: int, dims: int = 2) -> dict[str, Tensor]:
    """One training step as ``SemidiffModule`` takes it: RNG keyed by (seed, step), noise keyed by
    step, then backward, the optimiser step and ``on_step_end`` with the count including it."""
    labeled, unlabeled = batch(dims, seed=step)
    torch.manual_seed(1_000_003 + step)
    method.start_pseudo_noise_step(step)
    parts = method.training_step(labeled, unlabeled if method.uses_unlabeled else None, Progress(step, MAX_STEPS))
    opt.zero_grad()
    parts["loss"].backward()
    opt.step()
    method.on_step_end(Progress(step + 1, MAX_STEPS))
    return parts


# ---- the checks: plain functions, so any registered name can be checked --------------------------
def check_training_step(name: str, dims: int = 2) -> None:
    """Every part is a finite scalar; the loss reaches every trained network; weights move."""
    method = tiny_method(name, dims)
    opt = optimiser(method)
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert trainable, f"{name}: no trainable parameter"
    start = [p.detach().clone() for p in trainable]
    for step in range(MAX_STEPS):  # past every warm-up / pre-training of FAST_OPTIONS
        labeled, unlabeled = batch(dims, seed=step)
        method.start_pseudo_noise_step(step)
        parts = method.training_step(labeled, unlabeled if method.uses_unlabeled else None,
                                     Progress(step, MAX_STEPS))
        assert "loss" in parts and parts["loss"].requires_grad, f"{name}: 'loss' has no gradient"
        for part, value in parts.items():
            assert value.ndim == 0 and torch.isfinite(value), f"{name}: {part} = {value} (finite scalars only)"
        opt.zero_grad()
        parts["loss"].backward()
        grads = [p.grad for p in trainable if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), f"{name}: missing or non-finite gradients"
        opt.step()
        method.on_step_end(Progress(step + 1, MAX_STEPS))
    assert any(not torch.equal(a, p) for a, p in zip(start, trainable)), f"{name}: training changed no weight"


def check_predict(name: str, dims: int = 2) -> None:
    """``predict`` (and every named output) gives (B, C, *spatial) probabilities summing to 1."""
    method = tiny_method(name, dims).eval()
    image = batch(dims)[0]["image"]
    for output in (None, *method.outputs):
        probs = method.predictor(output)(image)
        assert probs.shape == (2, NUM_CLASSES, *SHAPES[dims]), f"{name} output {output}: shape {tuple(probs.shape)}"
        assert probs.min() >= 0, f"{name} output {output}: negative probability"
        torch.testing.assert_close(probs.float().sum(1), torch.ones(2, *SHAPES[dims]), msg=f"{name} output {output}")
    assert torch.equal(method.predict(image), method.predict(image)), f"{name}: predict is not repeatable"


def check_resume(name: str) -> None:
    """Steps, checkpoint (state dict + optimiser), a fresh build that loads it, more steps: the state
    equals that of an uninterrupted run exactly (EMA teachers, memory banks, prototypes, stages)."""
    straight = tiny_method(name)
    straight_opt = optimiser(straight)
    for step in range(MAX_STEPS):
        engine_step(straight, straight_opt, step)

    first = tiny_method(name)
    first_opt = optimiser(first)
    for step in range(RESUME_AT):
        engine_step(first, first_opt, step)
    saved = copy.deepcopy({"method": first.state_dict(), "optimiser": first_opt.state_dict()})
    del first, first_opt
    resumed = tiny_method(name, seed=1)  # other initial weights: everything must come from the checkpoint
    resumed.load_state_dict(saved["method"])
    resumed_opt = optimiser(resumed)
    resumed_opt.load_state_dict(saved["optimiser"])
    for step in range(RESUME_AT, MAX_STEPS):
        engine_step(resumed, resumed_opt, step)

    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resume"


def check_noise_hook(name: str) -> None:
    """A method that learns from unlabeled images passes its pseudo-labels through the hook, and
    what the hook returns is what it learns from (flip rate 1 changes the loss)."""
    method = tiny_method(name)
    if not method.uses_unlabeled:
        return
    calls: list[tuple[Tensor, Tensor]] = []
    original = method.corrupt_pseudo

    def spy(labels: Tensor) -> Tensor:
        out = original(labels)
        calls.append((labels, out))
        return out

    method.corrupt_pseudo = spy  # corrupt_soft_pseudo goes through it too
    labeled, unlabeled = batch()
    late = Progress(MAX_STEPS - 1, MAX_STEPS)  # past warm-ups and ramps' start
    torch.manual_seed(0)
    method.start_pseudo_noise_step(3)
    clean = method.training_step(labeled, unlabeled, late)
    method.set_pseudo_noise(NoiseConfig(target="pseudo", kind="flip", rate=1.0))
    calls.clear()
    torch.manual_seed(0)
    method.start_pseudo_noise_step(3)
    noisy = method.training_step(labeled, unlabeled, late)
    assert calls, f"{name} uses unlabeled data but never calls corrupt_pseudo / corrupt_soft_pseudo"
    assert all((before != after).all() for before, after in calls), f"{name}: flip rate 1 left a label unchanged"
    assert not torch.equal(clean["loss"], noisy["loss"]), f"{name}: the corrupted pseudo-labels reach no loss"


def check_options_round_trip(name: str) -> None:
    """Options dumped as a config file holds them (YAML) validate back to equal options, and the
    defaults are what an empty ``method.options`` gives."""
    cls = method_class(name)
    assert issubclass(cls.Options, MethodOptions) and cls.name == name
    method = tiny_method(name)
    dumped = yaml.safe_load(yaml.safe_dump(method.options.model_dump(mode="json")))
    assert method_options(name, dumped) == method.options, f"{name}: options do not survive a dump and reload"
    assert create_method(name, method.net_spec, dumped).options == method.options
    assert method_options(name, {}) == cls.Options()
    with pytest.raises(ConfigError, match="unknown key"):
        method_options(name, {"no_such_option_anywhere": 1})
    assert set(method.eval_options) <= set(dumped), f"{name}: eval_options must be options"


def check_unlabeled_required(name: str) -> None:
    """A semi-supervised method without unlabeled images says which setting to change."""
    method = tiny_method(name)
    if not method.uses_unlabeled:
        return
    with pytest.raises(ConfigError, match="unlabeled_batch"):
        method.training_step(batch()[0], None, Progress(MAX_STEPS - 1, MAX_STEPS))


def check_not_annotated_labels(name: str) -> None:
    """Labels that are IGNORE_INDEX everywhere give every supervised term (``loss_sup``,
    ``loss_<x>_sup``) exactly 0, diffusion label inputs and prototypes included; a partly
    annotated batch trains with finite parts."""
    method = tiny_method(name)
    labeled, unlabeled = batch()
    unlabeled = unlabeled if method.uses_unlabeled else None
    late = Progress(MAX_STEPS - 1, MAX_STEPS)  # past BCP's pre-training and ProtoDiff's warm-up
    parts = method.training_step({**labeled, "label": torch.full_like(labeled["label"], IGNORE_INDEX)}, unlabeled,
                                 late)
    supervised = [k for k in parts if SUPERVISED_PART.fullmatch(k)]
    assert supervised, f"{name}: no supervised part (loss_sup or loss_<x>_sup) in {sorted(parts)}"
    assert all(parts[k].item() == 0.0 for k in supervised), {k: parts[k].item() for k in supervised}
    method.on_step_end(Progress(MAX_STEPS, MAX_STEPS))
    partly = labeled["label"].clone()
    partly[..., :5, :] = IGNORE_INDEX
    parts = method.training_step({**labeled, "label": partly}, unlabeled, late)
    assert all(torch.isfinite(v).all() for v in parts.values()) and parts["loss"].requires_grad
    parts["loss"].backward()


def check_export_declaration(name: str) -> None:
    """``exportable_when`` (the export message) agrees with what ``export_net`` gives by default."""
    method = tiny_method(name)
    when = type(method).exportable_when
    if when is None:
        assert method.export_net() is None, f"{name}: export_net gives a network but exportable_when is None"
    elif when == "always":
        assert method.export_net() is not None, f"{name}: exportable_when 'always' but export_net is None"


CHECKS = (check_training_step, check_predict, check_resume, check_noise_hook, check_options_round_trip,
          check_unlabeled_required, check_not_annotated_labels, check_export_declaration)


# ---- the suite over the registry ----------------------------------------------------------------
@pytest.mark.parametrize("name", registered_methods())
def test_training_step_gives_finite_loss_and_gradients(name):
    check_training_step(name)


@pytest.mark.parametrize("name", registered_methods())
def test_training_step_in_3d(name):
    check_training_step(name, dims=3)


@pytest.mark.parametrize("name", registered_methods())
def test_predict_gives_probabilities_of_the_input_shape(name):
    check_predict(name)


@pytest.mark.parametrize("name", registered_methods())
def test_resume_from_a_state_dict_is_exact(name):
    check_resume(name)


@pytest.mark.parametrize("name", registered_methods())
def test_pseudo_labels_go_through_the_noise_hook(name):
    check_noise_hook(name)


@pytest.mark.parametrize("name", registered_methods())
def test_options_round_trip(name):
    check_options_round_trip(name)


@pytest.mark.parametrize("name", registered_methods())
def test_missing_unlabeled_batch_is_a_clear_error(name):
    check_unlabeled_required(name)


@pytest.mark.parametrize("name", registered_methods())
def test_not_annotated_pixels_never_count(name):
    check_not_annotated_labels(name)


@pytest.mark.parametrize("name", registered_methods())
def test_export_declaration_matches_export_net(name):
    check_export_declaration(name)


def test_suite_covers_every_registered_method(request):
    """What was collected is the registry: each check ran for every registered name."""
    collected: dict[str, set[str]] = {}
    for item in request.session.items:
        if item.module is request.module and hasattr(item, "callspec") and "name" in item.callspec.params:
            collected.setdefault(item.originalname, set()).add(item.callspec.params["name"])
    if len(collected) < 9:
        pytest.skip("only part of the suite was selected")
    assert all(names == set(list_methods()) for names in collected.values()), collected
    assert {"supervised", "mean_teacher"} <= set(list_methods())  # the registry is filled on import


# ---- a method defined here only: registering it is all it takes ---------------------------------
class ToyFixMatchOptions(MethodOptions):
    threshold: float = 0.0  # every pixel confident, so the pseudo-label term is never empty here
    unsup_weight: float = 1.0


class ToyFixMatch(Method):
    """FixMatch in a few lines: pseudo-labels from the weak view, learned on a strong view."""

    Options = ToyFixMatchOptions
    options: ToyFixMatchOptions
    uses_unlabeled = True
    exportable_when: ClassVar[str | None] = "always"

    def __init__(self, net: NetSpec, options: MethodOptions) -> None:
        super().__init__(net, options)
        self.student = build_net(net)

    def pseudo_labels(self, weak: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            confidence, labels = softmax_probs(self.student, weak).max(dim=1, keepdim=True)
        return self.corrupt_pseudo(labels), (confidence >= self.options.threshold).float()

    def training_step(self, labeled, unlabeled, progress: Progress) -> dict[str, Tensor]:
        weak = require_unlabeled(unlabeled, self.name)
        labels, confident = self.pseudo_labels(weak)
        mask = block_mask(weak.shape[2:], 0.5, weak.device)
        strong = cutmix(random_blur(intensity_jitter(weak, 0.2, 0.1), 0.5, (0.1, 1.0)), mask)
        loss_sup = seg_loss(self.student(labeled["image"]), labeled["label"])
        loss_unsup = seg_loss(self.student(strong), cutmix(labels, mask), cutmix(confident, mask))
        loss = loss_sup + self.options.unsup_weight * loss_unsup
        return {"loss": loss, "loss_sup": loss_sup.detach(), "loss_unsup": loss_unsup.detach()}

    @torch.no_grad()
    def predict(self, image: Tensor) -> Tensor:
        return softmax_probs(self.student, image)

    def export_net(self):
        return self.student


@contextlib.contextmanager
def registered(name: str, cls: type[Method]):
    """``cls`` registered as ``name`` for the duration of the block (the registry is global)."""
    register_method(name)(cls)
    try:
        yield
    finally:
        METHODS.unregister(name)


def test_a_toy_fixmatch_gets_every_check_by_registering():
    assert "toy_fixmatch" not in registered_methods()
    with registered("toy_fixmatch", ToyFixMatch):
        assert "toy_fixmatch" in registered_methods()  # what the parametrisation reads at collection
        for check in CHECKS:
            check("toy_fixmatch")
    assert "toy_fixmatch" not in list_methods()


# ---- each check catches what it is for ----------------------------------------------------------
class ToyWithoutNoiseHook(ToyFixMatch):
    """Makes its pseudo-labels without the hook: the noise benchmark would not reach it."""

    def pseudo_labels(self, weak: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            confidence, labels = softmax_probs(self.student, weak).max(dim=1, keepdim=True)
        return labels, (confidence >= self.options.threshold).float()


class ToyWithStateOutsideTheCheckpoint(ToyFixMatch):
    """Starts its unlabeled term after two steps, counted in a plain attribute that no checkpoint
    holds: a resumed run counts from 0 again and trains differently."""

    def __init__(self, net: NetSpec, options: MethodOptions) -> None:
        super().__init__(net, options)
        self.steps_seen = 0

    def training_step(self, labeled, unlabeled, progress: Progress) -> dict[str, Tensor]:
        if self.steps_seen >= 2:
            return super().training_step(labeled, unlabeled, progress)
        loss = seg_loss(self.student(labeled["image"]), labeled["label"])
        return {"loss": loss, "loss_sup": loss.detach()}

    def on_step_end(self, progress: Progress) -> None:
        self.steps_seen += 1


class PercentThresholdOptions(ToyFixMatchOptions):
    threshold: float = 95.0

    @field_validator("threshold")
    @classmethod
    def _percent_to_fraction(cls, v: float) -> float:
        return v / 100  # not idempotent: a saved config read back divides again


class ToyWithOptionsThatDoNotRoundTrip(ToyFixMatch):
    Options = PercentThresholdOptions


@pytest.mark.parametrize(("cls", "check", "message"), [
    (ToyWithoutNoiseHook, check_noise_hook, "never calls corrupt_pseudo"),
    (ToyWithStateOutsideTheCheckpoint, check_resume, "differs after resume"),
    (ToyWithOptionsThatDoNotRoundTrip, check_options_round_trip, "do not survive a dump"),
])
def test_each_check_can_fail(cls, check, message):
    with registered("toy_broken", cls), pytest.raises(AssertionError, match=message):
        check("toy_broken")


def test_the_other_registries_are_filled_on_import():
    assert {"unet2d", "vnet"} <= set(list_nets())
    assert {"synthetic", "nnunet"} <= set(READERS)
