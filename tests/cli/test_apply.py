"""``wsconvert apply`` (and ``inspect`` of its output) end to end through the entry point."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

import wsconvert

if TYPE_CHECKING:
    from conftest import Cli


def test_apply_json_and_inspect(cli: Cli, net_state: Path) -> None:
    before = cli.sha(net_state)
    proc = cli.run("apply", net_state, "--model", "wsnets:build", "--convention", "timm",
                   "--init", "exact", "--json", cwd=net_state.parent)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    out = net_state.with_name("net.ws.pt")
    assert report["output"] == str(out) and out.exists()
    status = {r["name"]: (r["status"], r["reason"]) for r in report["layers"]}
    assert status["stem"][0] == "converted" and status["grouped"][0] == "converted"
    assert status["dw1"] == ("skipped", "fan-in 1: standardizing would give NaN or a dead layer")
    assert status["head"][0] == "skipped"
    assert report["converted"] == 3 and report["convention"] == "timm"
    assert cli.sha(net_state) == before

    proc = cli.run("inspect", out, "-m", "wsnets:build", "--json", cwd=net_state.parent)
    assert proc.returncode == 0, proc.stderr
    info = {r["name"]: r for r in json.loads(proc.stdout)["layers"]}
    assert info["stem"]["ws"] == "wsconvert" and info["stem"]["convention"] == "timm"
    assert info["dw1"]["ws"] == "none" and info["dw1"]["fan_in"] == 1

    model = wsconvert.load(out, model="wsnets:build")
    assert len(list(wsconvert.surgery.ws_layers(model))) == 3


def test_apply_human_table(cli: Cli, net_state: Path) -> None:
    proc = cli.run("apply", net_state, "-m", "wsnets:build", "-o", "custom.ws.pt",
                   "--exclude", "grouped", cwd=net_state.parent)
    assert proc.returncode == 0, proc.stderr
    assert "matched by --exclude" in proc.stdout and "2 layer(s) converted" in proc.stdout
    assert (net_state.parent / "custom.ws.pt").exists()


def test_apply_errors_one_line_exit_2(cli: Cli, net_state: Path) -> None:
    cwd = net_state.parent
    cli.one_line_error(cli.run("apply", cwd / "missing.pt", "-m", "wsnets:build", cwd=cwd), 2,
                       "missing.pt", "no such file")
    cli.one_line_error(cli.run("apply", net_state, cwd=cwd), 2, "--model")
    cli.one_line_error(cli.run("apply", net_state, "-m", "wsnets:build", "--convention", "x",
                               cwd=cwd), 2,
                       "unknown convention")
    assert cli.run("apply", net_state, "-m", "wsnets:build", cwd=cwd).returncode == 0
    cli.one_line_error(cli.run("apply", net_state, "-m", "wsnets:build", cwd=cwd), 2,
                       "already exists")
    cli.one_line_error(cli.run("apply", cwd / "net.ws.pt", "-m", "wsnets:build", "-o", "again.pt",
                               cwd=cwd), 2,
                       "already has Weight Standardization")
    assert not (cwd / "again.pt").exists()
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)).state_dict(), cwd / "lin.pt")
    cli.one_line_error(cli.run("apply", cwd / "lin.pt", "-m", "wsnets:build", cwd=cwd), 2,
                       "missing")


def test_untrusted_pickle_refused(cli: Cli, nets_dir: Path) -> None:
    import wsnets  # type: ignore[import-not-found]

    torch.save(wsnets.build(), nets_dir / "whole.pt")
    cli.one_line_error(cli.run("apply", "whole.pt", cwd=nets_dir), 2, "wsnets.Net", "--trust")
    proc = cli.run("apply", "whole.pt", "--trust", "--json", cwd=nets_dir)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["converted"] == 3


def test_cli_apply_norm_gn_json(cli: Cli, net_state: Path) -> None:
    cwd = net_state.parent
    proc = cli.run("apply", net_state, "-m", "wsnets:build", "--norm", "gn", "--groups", "3",
                   "--input-shape", "2,3,10,10", "--json", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    norms = report["norm"]
    assert norms["mode"] == "gn" and norms["swapped"] == 1 and norms["rule"] == "fx"
    (bn,) = norms["norms"]
    assert (bn["name"], bn["groups"], bn["follows"]) == ("bn", 2, "stem")
    assert "not divisible by 3" in bn["reason"]
    drift = report["drift"]
    assert drift["before"]["samples"] == 4 and drift["after"] is None
    assert drift["before"]["layers"][0]["name"] == "stem"
    assert {r["name"]: r["converted_kind"] for r in drift["before"]["layers"]}["bn"] == "GroupNorm"
    assert drift["large"] and "GroupNorm swap" in drift["suggestion"]
    model = wsconvert.load(net_state.with_name("net.ws.pt"), model="wsnets:build")
    assert isinstance(model.bn, nn.GroupNorm) and model.bn.num_groups == 2


def test_cli_calibrate_with_inputs_and_human_output(cli: Cli, net_state: Path) -> None:
    cwd = net_state.parent
    np.savez(cwd / "probe.npz", x=np.random.default_rng(0).normal(size=(6, 3, 8, 8))
             .astype(np.float32))
    proc = cli.run("apply", net_state, "-m", "wsnets:build", "--calibrate", "3", "--inputs",
                   "probe.npz", "--json", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    drift = json.loads(proc.stdout)["drift"]
    assert drift["calibration"]["layers"] == ["bn"] and drift["calibration"]["samples"] == 18
    assert drift["after"]["output_relative"] != drift["before"]["output_relative"]
    proc = cli.run("apply", net_state, "-m", "wsnets:build", "--norm", "gn", "-o", "h.pt", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert "BatchNorm -> GroupNorm" in proc.stdout and "drift" in proc.stdout
    assert "1 BatchNorm(s) swapped to GroupNorm" in proc.stdout


def test_cli_errors_and_skips(cli: Cli, net_state: Path) -> None:
    cwd = net_state.parent
    cli.one_line_error(cli.run("apply", net_state, "-m", "wsnets:build", "--norm", "gn",
                               "--calibrate",
                               "2", cwd=cwd), 2, "--norm keep")
    cli.one_line_error(cli.run("apply", net_state, "-m", "wsnets:build", "--norm", "bn", cwd=cwd),
                       2,
                       "--norm")
    cli.one_line_error(cli.run("apply", net_state, "-m", "wsnets:build", "--input-shape", "2,5,8,8",
                               cwd=cwd), 2, "forward failed")
    assert not net_state.with_name("net.ws.pt").exists()
    # An inferred shape the model rejects only skips the report (mixed takes two inputs).
    import wsnets  # type: ignore[import-not-found]

    torch.save(wsnets.mixed().state_dict(), cwd / "mixed.pt")
    proc = cli.run("apply", "mixed.pt", "-m", "wsnets:mixed", "--json", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert "forward failed" in json.loads(proc.stdout)["drift"]["skipped"]
    assert "drift report skipped" in proc.stderr
    proc = cli.run("apply", "mixed.pt", "-m", "wsnets:mixed", "-o", "m2.pt", "--json",
                   "--input-shape", "2,4,9;2,2,3,5,5", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["drift"]["before"]["samples"] == 4
    assert subprocess.run([cli.exe, "apply", "--help"], capture_output=True).returncode == 0
