"""Recovery: closed-form norm refit and distillation against the original model."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from wsconvert.conventions import CONVENTIONS
from wsconvert.drift import calibrate_bn
from wsconvert.errors import UsageError, WsconvertError
from wsconvert.io.inputs import load_samples
from wsconvert.norms import swap_norm
from wsconvert.recovery import (
    DEFAULT_FEATURES,
    MIN_FIT,
    MIN_HOLDOUT,
    RecoveryInterrupted,
    RecoveryProgress,
    fit_norms,
    measure,
    recover,
)
from wsconvert.surgery import apply_ws


def _net(seed: int = 0) -> nn.Module:
    """A small BN classifier whose BNs hold non-trivial statistics and affines."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    calibrate_bn(net, [(_data(64, seed + 100),)])
    return net.eval()


def _data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g) * torch.rand(n, 3, 1, 1, generator=g) + 0.3


def _convert(net: nn.Module, convention: str = "paper", init: str = "plain",
             norm: str = "gn") -> nn.Module:
    model = apply_ws(net, convention, init=init).model
    if norm == "gn":
        model = swap_norm(model, 4, inplace=True).model
    return model


@pytest.mark.parametrize("init", ["plain", "exact"])
@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_recovery_improves_every_convention(convention: str, init: str) -> None:
    original = _net()
    converted = _convert(original, convention, init)
    data = _data(96, 1)
    report = recover(converted, original, data, steps=15, lr=3e-3, batch_size=16)
    before, closed, after = report.stages
    assert [s.stage for s in report.stages] == ["converted", "closed-form", "distill"]
    assert report.classifier
    assert closed.loss < before.loss
    assert after.loss <= closed.loss
    assert after.relative_error < before.relative_error
    assert after.agreement is not None and before.agreement is not None
    assert after.agreement >= before.agreement
    assert [r.name for r in report.fitted] == ["1", "4", "7"]
    # The report's figures are those of the model returned, measured again from outside.
    fresh = measure(converted, original, data[report_holdout(report, data)])
    assert fresh.relative_error == pytest.approx(after.relative_error, rel=1e-9)


def report_holdout(report: object, data: torch.Tensor) -> torch.Tensor:
    """The held-out indices recover() used for seed 0 and the default fraction."""
    from wsconvert.recovery import _split

    return _split(len(data), 0.2, 0, "data")[1]


def test_closed_form_recovers_an_exact_affine() -> None:
    """Only the BN affines changed: least squares finds the original ones (to rounding)."""
    original = _net()
    converted = copy.deepcopy(original)
    with torch.no_grad():
        for m in converted.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.mul_(3.0).add_(0.1)
                m.bias.sub_(0.7)
    data = _data(40, 2)
    fitted, skipped = fit_norms(converted, original, data)
    assert not skipped
    for r in fitted:
        assert r.before > 0.1
        assert r.after < 1e-6
    for a, b in zip(original.modules(), converted.modules(), strict=True):
        if isinstance(a, nn.BatchNorm2d):
            assert isinstance(b, nn.BatchNorm2d)
            torch.testing.assert_close(b.weight, a.weight, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b.bias, a.bias, rtol=1e-5, atol=1e-6)


def test_norm_keep_recalibrates_batchnorm_and_fits() -> None:
    original = _net()
    converted = _convert(original, norm="keep")
    report = recover(converted, original, _data(64, 3), steps=0)
    assert report.calibrated == ["1", "4", "7"]
    assert report.stages[1].relative_error < 0.5 * report.stages[0].relative_error


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    original = _net()
    data = _data(64, 4)
    states = []
    for seed in (0, 0, 1):
        converted = _convert(original)
        recover(converted, original, data, steps=6, seed=seed, batch_size=8)
        states.append(converted.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_never_worse_than_the_closed_form() -> None:
    """A learning rate that wrecks the model: the closed-form state comes back, bit for bit."""
    original = _net()
    data = _data(64, 5)
    closed = _convert(original)
    closed_report = recover(closed, original, data, steps=0)
    wrecked = _convert(original)
    report = recover(wrecked, original, data, steps=4, lr=50.0, eval_every=1)
    assert report.steps_run >= 1
    assert report.best_step == 0
    assert report.after.loss == closed_report.after.loss
    for k, v in closed.state_dict().items():
        assert torch.equal(v, wrecked.state_dict()[k])


def test_progress_reports_every_layer_and_step() -> None:
    original = _net()
    events: list[RecoveryProgress] = []
    recover(_convert(original), original, _data(32, 6), steps=3, eval_every=1,
            progress=events.append)
    closed = [e for e in events if e.stage == "closed-form"]
    distill = [e for e in events if e.stage == "distill"]
    assert [(e.done, e.total, e.detail) for e in closed] == [(1, 3, "1"), (2, 3, "4"),
                                                             (3, 3, "7")]
    assert [(e.done, e.total) for e in distill] == [(1, 3), (2, 3), (3, 3)]
    assert all(e.loss is not None and "agreement" in e.detail for e in distill)


@pytest.mark.parametrize("when", ["closed-form", "distill"])
def test_stop_leaves_the_model_unchanged(when: str) -> None:
    original = _net()
    converted = _convert(original)
    entry = copy.deepcopy(converted.state_dict())
    seen: list[str] = []

    def should_stop() -> bool:
        return when in seen

    with pytest.raises(RecoveryInterrupted) as info:
        recover(converted, original, _data(32, 7), steps=5,
                progress=lambda e: seen.append(e.stage), should_stop=should_stop)
    assert info.value.exit_code == 130
    for k, v in entry.items():
        assert torch.equal(v, converted.state_dict()[k])


def test_keyboard_interrupt_leaves_the_model_unchanged() -> None:
    original = _net()
    converted = _convert(original)
    entry = copy.deepcopy(converted.state_dict())

    def interrupt(event: RecoveryProgress) -> None:
        if event.stage == "distill" and event.done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recover(converted, original, _data(32, 7), steps=5, progress=interrupt)
    for k, v in entry.items():
        assert torch.equal(v, converted.state_dict()[k])


def test_mse_loss_for_non_classifier_outputs() -> None:
    original = _net()
    original[-1] = nn.Identity()  # features out: [N, 16] is still 2-d, make it 4-d
    original = nn.Sequential(*list(original)[:-3]).eval()
    converted = _convert(original)
    report = recover(converted, original, _data(32, 8), steps=3)
    assert not report.classifier
    assert report.loss == "mse"
    assert report.after.agreement is None
    assert report.after.relative_error < report.before.relative_error
    with pytest.raises(UsageError, match="loss 'kl' needs a classifier"):
        recover(_convert(original), original, _data(32, 8), steps=1, loss="kl")


def _crop_of(sample: torch.Tensor, out: torch.Tensor, pads: list[int]) -> bool:
    """Whether ``out`` is a window of ``sample`` (or its flip along the last dimension),
    reflect-padded by ``pads`` per spatial dimension: written independently of the library."""
    import itertools

    padding = [p for p in reversed(pads) for _ in (0, 1)]
    for cand in (sample, sample.flip(-1)):
        padded = torch.nn.functional.pad(cand[None], padding, mode="reflect")[0]
        spatial = out.shape[1:]
        for starts in itertools.product(*(range(2 * p + 1) for p in pads)):
            window = padded[(slice(None), *(slice(a, a + n) for a, n in zip(starts, spatial,
                                                                               strict=True)))]
            if torch.equal(window, out):
                return True
    return False


def test_augment_flips_and_shifts_within_an_eighth() -> None:
    from wsconvert.recovery.distill import augment

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 16, 24, generator=g)
    second = x * 2 + 1  # a second input: the same flip and shift must apply to it
    a, b = augment((x, second), torch.Generator().manual_seed(1))
    assert a.shape == x.shape and b.shape == second.shape
    torch.testing.assert_close(b, a * 2 + 1)
    assert all(_crop_of(x[i], a[i], [2, 3]) for i in range(16))
    # Not a window of a bigger shift: 1/8 of the size at most (16 // 8 = 2, 24 // 8 = 3).
    assert not all(_crop_of(x[i], a[i], [0, 0]) for i in range(16))  # something moved
    again = augment((x, second), torch.Generator().manual_seed(1))
    torch.testing.assert_close(again[0], a)  # seeded


def test_augment_on_small_and_1d_inputs() -> None:
    from wsconvert.recovery.distill import augment

    x = torch.randn(8, 2, 7, 7)  # under 8 pixels: no shift, a flip at most
    out = augment((x,), torch.Generator().manual_seed(0))[0]
    for i in range(8):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    sig = torch.randn(8, 2, 40)
    out = augment((sig,), torch.Generator().manual_seed(0))[0]
    assert all(_crop_of(sig[i], out[i], [5]) for i in range(8))


def test_augment_applies_only_to_spatial_inputs() -> None:
    from wsconvert.recovery.distill import can_augment

    assert can_augment((torch.zeros(2, 3, 8, 8),))
    assert can_augment((torch.zeros(2, 3, 8),))
    assert can_augment((torch.zeros(2, 3, 4, 8, 8),))
    assert not can_augment((torch.zeros(2, 3),))  # features, no spatial dimension
    assert not can_augment((torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 4, 4)))  # different sizes
    original = _net()
    report = recover(_convert(original), original, _data(32, 3), steps=2)
    assert report.augment
    report = recover(_convert(original), original, _data(32, 3), steps=2, augment=False)
    assert not report.augment
    report = recover(_convert(original), original, _data(32, 3), steps=0)
    assert not report.augment  # no distillation: nothing was augmented
    mlp = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    calibrate_bn(mlp, [(torch.randn(64, 6),)])
    report = recover(copy.deepcopy(mlp), mlp, torch.randn(32, 6), steps=2, features=0.0)
    assert not report.augment  # asked for by default, not applicable: reported off
    assert report.notes == [] and report.to_dict()["notes"] == []  # the default stays quiet
    report = recover(copy.deepcopy(mlp), mlp, torch.randn(32, 6), steps=2, features=0.0,
                     augment=True, name="feats.pt")
    assert not report.augment
    assert report.notes == ["`augment=True`: not applied; it needs inputs [N, C, *spatial] "
                            "with 1-3 spatial dimensions, the same for every input (feats.pt)"]
    assert report.to_dict()["notes"] == report.notes
    report = recover(copy.deepcopy(mlp), mlp, torch.randn(32, 6), steps=0, augment=True)
    assert report.notes == []  # no distillation: there was nothing to augment


def test_augment_changes_what_distillation_sees() -> None:
    original = _net()
    runs = {}
    for flag in (True, False):
        converted = _convert(original)
        recover(converted, original, _data(48, 4), steps=6, augment=flag, eval_every=100)
        runs[flag] = converted.state_dict()
    assert any(not torch.equal(runs[True][k], runs[False][k]) for k in runs[True])


# ---------------------------------------------------------------------------- bad input


def test_too_few_samples_at_the_edge() -> None:
    original = _net()
    enough = MIN_HOLDOUT + MIN_FIT
    report = recover(_convert(original), original, _data(enough, 9), steps=0)
    assert (report.samples_fit, report.samples_holdout) == (MIN_FIT, MIN_HOLDOUT)
    with pytest.raises(UsageError, match=r"calib\.pt: 3 sample\(s\) is too few"):
        recover(_convert(original), original, _data(enough - 1, 9), steps=0, name="calib.pt")


@pytest.mark.parametrize(("data", "message"), [
    (torch.full((8, 3, 8, 8), float("nan")), "data: holds NaN or inf values"),
    (torch.ones(8, 3, 8, 8, dtype=torch.uint8), "must be floating point"),
    (torch.ones(8, 1, 8, 8), "samples have 1 channel"),
    (torch.ones(8), r"need shape \[N, C, \.\.\.\]"),
])
def test_bad_data_is_refused_and_nothing_changes(data: torch.Tensor, message: str) -> None:
    original = _net()
    converted = _convert(original)
    entry = copy.deepcopy(converted.state_dict())
    with pytest.raises(UsageError, match=message):
        recover(converted, original, data, steps=1)
    for k, v in entry.items():
        assert torch.equal(v, converted.state_dict()[k])


def test_wrong_spatial_size_names_the_data() -> None:
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                             nn.Linear(4 * 6 * 6, 3)).eval()
    with pytest.raises(UsageError, match=r"imgs: the model cannot run on these samples of shape "
                                         r"\[3, 9, 9\]"):
        recover(_convert(original), original, torch.randn(8, 3, 9, 9), name="imgs")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"steps": -1}, "steps` must be an integer >= 0"),
    ({"batch_size": 0}, "batch_size` must be an integer >= 1"),
    ({"lr": 0.0}, "lr` must be a finite number > 0"),
    ({"holdout": 0.0}, "holdout` must be"),
    ({"loss": "l1"}, "loss` must be one of"),
    ({"features": -1.0}, "features` must be"),
])
def test_bad_settings(kwargs: dict[str, object], message: str) -> None:
    original = _net()
    with pytest.raises(UsageError, match=message):
        recover(_convert(original), original, _data(16, 0), **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- files


def test_load_samples_from_tensor_files(tmp_path: Path) -> None:
    data = _data(6, 0)
    pt, npy, npz = (tmp_path / n for n in ("s.pt", "s.npy", "s.npz"))
    torch.save({"inputs": data}, pt)
    np.save(npy, data.numpy())
    np.savez(npz, x=data.numpy())
    for path in (pt, npy, npz):
        (loaded,) = load_samples(path)
        torch.testing.assert_close(loaded, data)


def test_load_samples_refuses_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "nan.npy"
    np.save(bad, np.full((4, 3, 2, 2), np.nan, dtype=np.float32))
    with pytest.raises(UsageError, match=r"nan\.npy: holds NaN"):
        load_samples(bad)
    missing = tmp_path / "missing.pt"
    with pytest.raises(WsconvertError, match=r"missing\.pt"):
        load_samples(missing)
    with pytest.raises(UsageError, match="apply to a folder of images"):
        load_samples(bad, image_size=8)


# ---------------------------------------------------------------------------- the command line


@pytest.fixture
def calib(nets_dir: Path) -> Path:
    path = nets_dir / "calib.pt"
    torch.save(_data(24, 11), path)
    return path


def test_cli_and_api_give_the_same_model(cli: Any, net_state: Path, calib: Path) -> None:
    import json

    import wsnets  # type: ignore[import-not-found]

    import wsconvert

    proc = cli.run("apply", net_state, "-m", "wsnets:build", "--norm", "gn", "--groups", "4",
                   "--calib-data", calib, "--recover-steps", "3", "--recover-seed", "5",
                   "--input-shape", "2,3,8,8", "--json", cwd=net_state.parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bar (nor its blank line) when stderr is a log
    payload = json.loads(proc.stdout)["recovery"]
    assert [s["stage"] for s in payload["stages"]] == ["converted", "closed-form", "distill"]
    assert (payload["samples_fit"], payload["samples_holdout"], payload["steps_run"]) == (19, 5, 3)
    from_cli = wsconvert.load(net_state.with_name("net.ws.pt"), model="wsnets:build")

    original = wsnets.build()
    original.load_state_dict(torch.load(net_state))
    converted = _convert(original)
    report = wsconvert.recover(converted, original, torch.load(calib), steps=3, seed=5)
    assert report.to_dict()["stages"][1]["loss"] == pytest.approx(
        payload["stages"][1]["loss"], rel=1e-6)
    state = converted.state_dict()
    for key, value in from_cli.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=1e-5, atol=1e-6)


def test_cli_augment_flag(cli: Any, net_state: Path, calib: Path) -> None:
    import json

    for flag, want in (("--recover-augment", True), ("--no-recover-augment", False)):
        out = net_state.with_name(f"aug-{want}.ws.pt")
        proc = cli.run("apply", net_state, "-m", "wsnets:build", "--norm", "gn", "--groups", "4",
                       "--calib-data", calib, "--recover-steps", "2", flag, "-o", out,
                       "--input-shape", "2,3,8,8", "--json", cwd=net_state.parent)
        assert proc.returncode == 0, proc.stderr
        rec = json.loads(proc.stdout)["recovery"]
        assert rec["augment"] is want
        assert rec["features"] == pytest.approx(DEFAULT_FEATURES)


def test_cli_says_when_asked_augmentation_cannot_apply(cli: Any, nets_dir: Path) -> None:
    import wsnets  # type: ignore[import-not-found]

    torch.save(wsnets.mixed().state_dict(), nets_dir / "mixed.pt")
    g = torch.Generator().manual_seed(0)
    torch.save((torch.randn(12, 4, 9, generator=g), torch.randn(12, 2, 3, 5, 5, generator=g)),
               nets_dir / "pairs.pt")  # two inputs of different spatial shapes
    base = ["apply", nets_dir / "mixed.pt", "-m", "wsnets:mixed", "--calib-data", "pairs.pt",
            "--recover-steps", "2", "--input-shape", "2,4,9;2,2,3,5,5", "--force"]
    proc = cli.run(*base, "--recover-augment", cwd=nets_dir)
    assert proc.returncode == 0, proc.stderr
    assert "--recover-augment: not applied" in proc.stderr
    proc = cli.run(*base, cwd=nets_dir)  # not asked for: the default stays quiet
    assert proc.returncode == 0, proc.stderr
    assert "not applied" not in proc.stderr


def test_cli_reads_an_image_folder(cli: Any, net_state: Path) -> None:
    import json

    from PIL import Image

    folder = net_state.parent / "images"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for k in range(6):
        pixels = torch.randint(0, 256, (10 + k, 12, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{k}.png")
    code, out, err = cli.invoke("apply", net_state, "-m", "wsnets:build", "--calib-data", folder,
                                "--image-size", "8", "--mean", "0.5,0.5,0.5", "--std",
                                "0.25,0.25,0.25", "--recover-steps", "0", "--json")
    assert code == 0, err
    rec = json.loads(out)["recovery"]
    assert rec["samples_fit"] + rec["samples_holdout"] == 6
    assert rec["calibrated"] == ["bn"] and [r["name"] for r in rec["fitted"]] == ["bn"]


def test_cli_bad_recovery_input(cli: Any, net_state: Path, calib: Path) -> None:
    from PIL import Image

    cwd = net_state.parent
    base = ["apply", net_state, "-m", "wsnets:build", "-o", cwd / "out.ws.pt"]
    empty = cwd / "empty"
    empty.mkdir()
    mixed = cwd / "mixed"
    mixed.mkdir()
    Image.new("RGB", (4, 4)).save(mixed / "a.png")
    Image.new("RGB", (5, 4)).save(mixed / "b.png")
    texts = cwd / "texts"
    texts.mkdir()
    Image.new("RGB", (4, 4)).save(texts / "a.png")
    (texts / "notes.txt").write_text("x")
    nan = cwd / "nan.npy"
    np.save(nan, np.full((8, 3, 4, 4), np.nan, dtype=np.float32))
    grey = cwd / "grey.npy"
    np.save(grey, np.ones((8, 1, 4, 4), dtype=np.float32))
    few = cwd / "few.npy"
    np.save(few, np.ones((3, 3, 4, 4), dtype=np.float32))
    cases: list[tuple[list[Any], tuple[str, ...]]] = [
        (["--calib-data", calib, "--recover-steps", "-1"],
         ("--recover-steps must be an integer >= 0",)),
        (["--calib-data", empty], ("empty: holds no image file",)),
        (["--calib-data", texts], ("notes.txt: not an image file",)),
        (["--calib-data", mixed], ("b.png: 5x4 pixels", "pass --image-size")),
        (["--calib-data", nan], ("nan.npy: holds NaN",)),
        (["--calib-data", grey], ("--calib-data", "grey.npy", "1 channel(s)")),
        (["--calib-data", few], ("few.npy", "3 sample(s) is too few")),
        (["--calib-data", calib, "--image-size", "8"], ("apply to a folder of images",)),
        (["--calib-data", cwd / "missing.pt"], ("missing.pt",)),
        (["--recover-steps", "5"], ("--recover-steps need --calib-data",)),
        (["--image-size", "8"], ("--image-size need --calib-data",)),
        (["--recover-augment"], ("--recover-augment need --calib-data",)),
        (["--no-recover-augment"], ("--no-recover-augment need --calib-data",)),
        (["--recover-seed", "3"], ("--recover-seed need --calib-data",)),
        (["--calib-data", calib, "--calibrate", "2"], ("--calib-data", "drop --calibrate")),
        (["--calib-data", calib, "--recover-lr", "0"], ("--recover-lr must be",)),
        (["--calib-data", calib, "--recover-holdout", "1.5"], ("--recover-holdout must be",)),
        (["--calib-data", texts, "--mean", "a,b,c"], ("--mean wants comma-separated",)),
    ]
    for extra, needles in cases:
        cli.assert_bad([*base, *extra], *needles, cwd=cwd)


def test_cli_ctrl_c_during_distillation_writes_nothing(
        cli: Any, net_state: Path, calib: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    from wsconvert.cli import apply as apply_cli

    update = apply_cli._RecoveryView.update

    def update_then_interrupt(self: Any, event: RecoveryProgress) -> None:
        update(self, event)
        if event.stage == "distill" and event.done == 2:
            signal.raise_signal(signal.SIGINT)  # a real Ctrl-C, to the command's own handler

    monkeypatch.setattr(apply_cli._RecoveryView, "update", update_then_interrupt)
    cwd = net_state.parent
    before = {p.name for p in cwd.iterdir()}
    proc = cli.run("apply", net_state, "-m", "wsnets:build", "--calib-data", calib,
                   "--recover-steps", "50", in_process=True)
    cli.one_line_error(proc, 130, "recovery stopped")
    assert {p.name for p in cwd.iterdir()} == before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---------------------------------------------------------------------------- measured advice


def _advice(norm: str, init: str) -> Any:
    from wsconvert.drift import check_drift
    from wsconvert.probes import ProbeSource

    original = _net()
    converted = _convert(original, init=init, norm=norm)
    return check_drift(original, converted, ProbeSource(shapes=((4, 3, 8, 8),)), init=init,
                       norm=norm, alternatives=lambda i: _convert(original, init=i, norm=norm))


def test_advice_suggests_only_an_init_measured_lower() -> None:
    from wsconvert.drift import measure_inits

    check = _advice("keep", "plain")  # exact keeps every conv: measured ~0 drift
    assert set(check.alternatives) == {"scale", "exact"}
    assert check.alternatives["exact"] < 1e-4 < check.before.output_relative
    assert "--init exact: measured" in check.suggestion
    gn = _advice("gn", "exact")
    assert gn.large
    for alt, drift in gn.alternatives.items():
        helps = drift < gn.before.output_relative
        assert (f"--init {alt}: measured" in gn.suggestion) is helps
        assert (f"--init {alt} was measured on these probes and does not help"
                in gn.suggestion) is not helps
    assert "--calib-data PATH" in gn.suggestion and "not measured here" in gn.suggestion
    original = _net()
    batches = [(torch.randn(4, 3, 8, 8),)]
    measured = measure_inits(original, lambda i: _convert(original, init=i, norm="keep"),
                             batches, ["plain", "exact"])
    assert measured["exact"] < 1e-4 < measured["plain"]


def test_advice_without_measurement_says_so() -> None:
    from wsconvert.drift import check_drift
    from wsconvert.probes import ProbeSource

    original = _net()
    check = check_drift(original, _convert(original, norm="keep"),
                        ProbeSource(shapes=((4, 3, 8, 8),)))
    assert check.alternatives == {}
    assert "--init exact (not measured on these probes)" in check.suggestion


def test_a_closed_form_that_measures_worse_is_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    import wsconvert.recovery as recovery

    def wreck(converted: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            for m in converted.modules():
                if isinstance(m, nn.GroupNorm):
                    m.weight.mul_(-3.0)
        return [], {}

    monkeypatch.setattr(recovery, "fit_norms", wreck)
    original = _net()
    for steps, lr in ((0, 1e-3), (3, 50.0)):
        converted = _convert(original)
        entry = copy.deepcopy(converted.state_dict())
        report = recover(converted, original, _data(32, 12), steps=steps, lr=lr, eval_every=1)
        assert report.kept == "converted" and report.best_step == 0
        assert report.stages[1].loss > report.stages[0].loss
        assert report.after.loss == report.before.loss
        for k, v in entry.items():
            assert torch.equal(v, converted.state_dict()[k])


def test_a_closed_form_that_is_not_finite_is_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    import wsconvert.recovery as recovery

    def poison(converted: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            for m in converted.modules():
                if isinstance(m, nn.GroupNorm):
                    m.bias.fill_(float("nan"))
        return [], {}

    monkeypatch.setattr(recovery, "fit_norms", poison)
    original = _net()
    for steps in (0, 3):
        converted = _convert(original)
        entry = copy.deepcopy(converted.state_dict())
        report = recover(converted, original, _data(32, 12), steps=steps, eval_every=1)
        assert math.isnan(report.stages[1].loss)
        assert report.kept in ("converted", "distill") and math.isfinite(report.after.loss)
        if report.kept == "converted":
            for k, v in entry.items():
                assert torch.equal(v, converted.state_dict()[k])
        assert all(bool(torch.isfinite(t).all()) for t in converted.state_dict().values()
                   if t.is_floating_point())


@pytest.mark.parametrize("seed", [-1, 2**63 - 1, 1.5, True])
def test_recover_refuses_a_seed_it_cannot_use(seed: Any) -> None:
    original = _net()
    with pytest.raises(UsageError, match="`seed` must be an integer"):
        recover(_convert(original), original, _data(32, 12), steps=1, seed=seed)


def test_recover_leaves_no_evaluation_cache_in_a_training_model() -> None:
    """recover measures in eval mode; a model handed back in training mode keeps no cached
    standardized weight (the eval cache and training never coexist)."""
    from wsconvert.surgery import ws_layers

    original = _net()
    converted = _convert(original).train()
    recover(converted, original, _data(32, 3), steps=2)
    assert converted.training
    assert all(p._cache is None for _, _, p in ws_layers(converted))
