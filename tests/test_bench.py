"""The benchmark: structure and plumbing only (no timed assertions)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_conventions import seed_paper, timm_batch_norm
from torch import nn

from wsconvert import apply_ws
from wsconvert.bench import (
    OPTIMIZERS,
    BenchConfig,
    _seed_weight,
    _timm_weight,
    _with_formula,
    estimated_passes,
    plain_counterpart,
    reference_net,
    run_bench,
)
from wsconvert.errors import UsageError
from wsconvert.ws import ws_parametrization

TINY = {"input_shape": (3, 16, 16), "rounds": 2, "warmup": 1, "threads": 1}


def test_reference_net_is_the_one_from_the_issue() -> None:
    net = reference_net()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 9
    assert all(c.bias is None for c in convs)
    assert convs[0].kernel_size == (7, 7) and convs[0].stride == (2, 2)
    assert [c.stride[0] for c in convs[1::2]] == [1, 2, 2, 2]
    assert [c.out_channels for c in convs] == [64, 64, 64, 128, 128, 256, 256, 512, 512]
    assert sum(c.weight.numel() for c in convs) == 4_728_000
    assert sum(isinstance(m, nn.GroupNorm) and m.num_groups == 8 for m in net.modules()) == 9
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_reference_formulas_match_the_oracles() -> None:
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(_seed_weight(w), seed_paper(w))
    torch.testing.assert_close(_timm_weight(w), timm_batch_norm(w))
    layer = nn.Conv2d(4, 6, 3).double()
    assert _with_formula(layer, _seed_weight) == 1
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), nn.functional.conv2d(x, seed_paper(layer.weight),
                                                              layer.bias))


def test_bench_reference_net_structure() -> None:
    cfg = BenchConfig(batch_sizes=(1, 2), conventions=("paper", "timm"), **TINY)
    report = run_bench(config=cfg)
    assert [s.batch_size for s in report.settings] == [1, 2]
    forms = [r.form for r in report.settings[0].rows]
    assert forms == ["plain", "wsconvert:paper", "wsconvert:timm", "seed", "timm-bn"]
    for s in report.settings:
        plain = s.row("plain")
        assert plain.ratio == 1.0 and plain.paired_ratio == 1.0
        for r in s.rows:
            assert 0 < r.min_ms <= r.median_ms <= r.max_ms
            assert math.isfinite(r.ratio) and r.ratio > 0
    assert report.conv_parameters == 4_728_000 and report.ws_layers == 9
    assert report.threads == 1 and report.clock == "wall"
    d = json.loads(json.dumps(report.to_dict()))
    assert d["input_shape"] == [3, 16, 16]
    assert d["settings"][1]["rows"][0]["form"] == "plain"


def test_bench_restores_thread_count() -> None:
    before = torch.get_num_threads()
    run_bench(config=BenchConfig(batch_sizes=(1,), conventions=("bit",), references=(),
                                 input_shape=(3, 8, 8), rounds=1, warmup=0, threads=1))
    assert torch.get_num_threads() == before


def _user_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


def test_bench_ws_model_against_its_plain_counterpart() -> None:
    ws = apply_ws(_user_net(), "tf").model
    plain = plain_counterpart(ws)
    assert all(ws_parametrization(m) is None for m in plain.modules())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(plain(x), ws(x))
    assert ws_parametrization(ws[0]) is not None  # the input is untouched

    cfg = BenchConfig(batch_sizes=(2,), accumulate=2, conventions=("tf", "bit"),
                      input_shape=(3, 8, 8), rounds=2, warmup=1, clock="cpu")
    report = run_bench(ws, cfg, model_name="user")
    forms = [r.form for r in report.settings[0].rows]
    assert forms == ["plain", "wsconvert:tf (model's own)", "wsconvert:bit", "seed", "timm-bn"]
    assert report.model == "user" and report.accumulate == 2 and report.ws_layers == 2
    assert any("accumulate" in n for n in report.notes)
    assert ws_parametrization(ws[0]) is not None


@pytest.mark.parametrize("bad", [
    {"batch_sizes": ()}, {"batch_sizes": (0,)}, {"accumulate": 0}, {"conventions": ("nope",)},
    {"references": ("nope",)}, {"clock": "sundial"}, {"input_shape": (3, 0, 4)},
    {"optimizer": "lbfgs"},
])
def test_bench_config_rejects_bad_settings(bad: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        run_bench(config=BenchConfig(**bad))  # type: ignore[arg-type]


EXE = shutil.which("wsconvert", path=str(Path(sys.executable).parent)) or "wsconvert"


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "WSCONVERT_DEBUG"}
    env["COLUMNS"] = "200"
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=120)


def test_cli_bench_json_end_to_end() -> None:
    proc = _cli("bench", "--json", "--input-shape", "3,16,16", "--batch-sizes", "1",
                "--convention", "timm", "--rounds", "2", "--warmup", "0", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["model"] == "reference net" and d["threads"] == 1
    assert [r["form"] for r in d["settings"][0]["rows"]] == ["plain", "wsconvert:timm", "seed",
                                                             "timm-bn"]


def test_cli_bench_checkpoint_table(tmp_path: Path) -> None:
    ws = apply_ws(_user_net(), "bit").model
    from wsconvert.io.wsfile import save

    save(ws, tmp_path / "m.ws.pt")
    proc = _cli("bench", str(tmp_path / "m.ws.pt"), "--input-shape", "3,8,8", "--batch-sizes",
                "1", "--rounds", "1", "--warmup", "0", "--no-references", "--trust")
    assert proc.returncode == 0, proc.stderr
    assert "wsconvert:bit (model's own)" in proc.stdout and "plain" in proc.stdout


def test_cli_bench_bad_flags_one_line_error() -> None:
    proc = _cli("bench", "--batch-sizes", "one", "--rounds", "1")
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("error:") and "--batch-sizes" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_dense_output_model_gets_dense_targets() -> None:
    torch.manual_seed(0)
    seg = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))
    report = run_bench(seg, BenchConfig(batch_sizes=(2,), conventions=("timm",), references=(),
                                        input_shape=(3, 6, 6), rounds=1, warmup=0))
    assert [r.form for r in report.settings[0].rows] == ["plain", "wsconvert:timm"]


def test_bench_refuses_a_model_without_tensor_output() -> None:
    class Dict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"out": self.conv(x)}

    with pytest.raises(UsageError, match="output"):
        run_bench(Dict(), BenchConfig(batch_sizes=(1,), input_shape=(3, 6, 6), rounds=1))


def test_bench_refuses_an_input_shape_that_does_not_fit() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(UsageError, match="does not fit"):
        run_bench(net, BenchConfig(batch_sizes=(1,), input_shape=(5, 6, 6), rounds=1))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_bench_optimizers_and_eval_rows(optimizer: str) -> None:
    cfg = BenchConfig(batch_sizes=(1,), conventions=("aws",), optimizer=optimizer, evaluate=True,
                      **TINY)
    report = run_bench(config=cfg)
    assert report.optimizer == optimizer
    assert [(s.batch_size, s.mode) for s in report.settings] == [(1, "train"), (1, "eval")]
    train, ev = report.settings
    for s in report.settings:
        assert [r.form for r in s.rows] == ["plain", "wsconvert:aws", "seed", "timm-bn"]
        for r in s.rows:
            assert set(r.vs_references) == {"seed", "timm-bn"}
            assert r.min_ratio > 0 and math.isfinite(r.min_ratio)
        assert s.row("seed").vs_references["seed"] == 1.0
    assert train.row("plain").passes == estimated_passes("plain", optimizer=optimizer)
    assert train.row("wsconvert:aws").passes == estimated_passes("wsconvert:aws",
                                                                 optimizer=optimizer)
    assert train.row("wsconvert:aws").passes == train.row("plain").passes + 11
    assert [r.passes for r in ev.rows] == [0, 0, 6, 4]
    d = json.loads(json.dumps(report.to_dict()))
    assert d["settings"][1]["mode"] == "eval" and d["optimizer"] == optimizer


def test_estimated_passes_model() -> None:
    # Plain SGD: read the gradient and the weight, write the weight.
    assert [estimated_passes("plain", optimizer=o) for o in OPTIMIZERS] == [3, 8, 20]
    # WS: forward mean / centre / norm / scale (6), backward kernel 5; a gain and beta one more
    # in-place sweep each.
    assert estimated_passes("wsconvert:paper") == 3 + 11
    assert estimated_passes("wsconvert:scaled", gain=True) == 3 + 13
    assert estimated_passes("wsconvert:paper", gain=True, shift=True) == 3 + 15
    # Accumulation: wsconvert standardizes once per step, the references per micro-batch.
    assert estimated_passes("wsconvert:tf", accumulate=8) == 3 + 7 * 3 + 11
    assert estimated_passes("timm-bn", accumulate=8) == 3 + 7 * 3 + 8 * 9
    assert estimated_passes("wsconvert:tf", mode="eval") == 0
    assert estimated_passes("seed", mode="eval") == 6
    with pytest.raises(UsageError):
        estimated_passes("nope")
    with pytest.raises(UsageError):
        estimated_passes("plain", optimizer="nope")


def test_cli_bench_optimizer_and_eval() -> None:
    proc = _cli("bench", "--json", "--input-shape", "3,16,16", "--batch-sizes", "1",
                "--convention", "bit", "--no-references", "--rounds", "1", "--warmup", "0",
                "--threads", "1", "--optimizer", "sgd-momentum", "--eval")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["optimizer"] == "sgd-momentum"
    assert [(s["mode"], [r["passes"] for r in s["rows"]]) for s in d["settings"]] == [
        ("train", [8, 19]), ("eval", [0, 0])]
    table = _cli("bench", "--input-shape", "3,16,16", "--batch-sizes", "1", "--convention",
                 "bit", "--rounds", "1", "--warmup", "0", "--threads", "1", "--eval")
    assert table.returncode == 0, table.stderr
    assert "passes (est.)" in table.stdout and "x timm-bn" in table.stdout
    assert "eval" in table.stdout


def test_cli_bench_unknown_optimizer_one_line_error() -> None:
    proc = _cli("bench", "--optimizer", "lbfgs", "--rounds", "1")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "lbfgs" in proc.stderr


def test_cli_bench_shape_error_names_the_flag(tmp_path: Path) -> None:
    from wsconvert.io.wsfile import save

    save(apply_ws(_user_net(), "bit").model, tmp_path / "m.ws.pt")
    proc = _cli("bench", str(tmp_path / "m.ws.pt"), "--input-shape", "5,8,8", "--rounds", "1",
                "--trust")
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert line.startswith("error:") and "--input-shape 5,8,8 does not fit" in line, line


def test_bench_counts_the_gain_sweep() -> None:
    cfg = BenchConfig(batch_sizes=(1,), conventions=("scaled", "bit"), references=(),
                      input_shape=(3, 8, 8), rounds=1, warmup=0, threads=1)
    rows = run_bench(config=cfg).settings[0]
    assert rows.row("wsconvert:scaled").passes == 3 + 13
    assert rows.row("wsconvert:bit").passes == 3 + 11


def test_cli_bench_ahead_rows() -> None:
    proc = _cli("bench", "--json", "--input-shape", "3,16,16", "--batch-sizes", "1",
                "--convention", "paper", "--convention", "timm", "--no-references",
                "--rounds", "1", "--warmup", "0", "--threads", "1", "--ahead", "--eval")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    forms = ["plain", "wsconvert:paper", "wsconvert:timm", "wsconvert-ahead:paper",
             "wsconvert-ahead:timm"]
    assert [[r["form"] for r in s["rows"]] for s in d["settings"]] == [forms, forms]
    train = {r["form"]: r["passes"] for r in d["settings"][0]["rows"]}
    assert train["wsconvert-ahead:paper"] == train["wsconvert:paper"] == 14
