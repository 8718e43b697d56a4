"""WS models in real training setups: AMP, DDP, torch.compile, state dicts, copies, dtypes."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_conventions import seed_paper
from torch import nn

from wsconvert import accumulate, apply_ws
from wsconvert.conventions import CONVENTIONS
from wsconvert.ws import trainable_weight, ws_parametrization


def small_net(seed: int = 0, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.GroupNorm(2, width), nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1, groups=2), nn.GroupNorm(2, width),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5))


def ws_net(convention: str = "paper", seed: int = 0, init: str = "plain") -> nn.Module:
    return apply_ws(small_net(seed), convention, init=init).model


def batch(n: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 12, 12, generator=g), torch.randint(0, 5, (n,), generator=g)


def train(model: nn.Module, steps: int = 3, lr: float = 0.1) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for i in range(steps):
        x, t = batch(seed=i)
        loss = F.cross_entropy(model(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ------------------------------------------------------------------------------------------ AMP


def _autocast_works(dtype: torch.dtype) -> bool:
    try:
        with torch.autocast("cpu", dtype=dtype):
            nn.functional.conv2d(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 2, 2))
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_autocast_training_finite_with_fp32_statistics(dtype: torch.dtype,
                                                       convention: str) -> None:
    if not _autocast_works(dtype):
        pytest.skip(f"CPU autocast to {dtype} is not supported by this torch build")
    model = ws_net(convention)
    with torch.no_grad():  # small filters: their std underflows in half precision
        for m in model.modules():
            if ws_parametrization(m) is not None:
                trainable_weight(m).mul_(1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    seen: list[torch.dtype] = []
    hook = model[0].register_forward_pre_hook(lambda m, _: seen.append(m.weight.dtype))
    for i in range(4):
        x, t = batch(seed=i)
        with torch.autocast("cpu", dtype=dtype):
            out = model(x)
            assert out.dtype == dtype
            loss = F.cross_entropy(out.float(), t)
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss)
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        opt.step()
    hook.remove()
    assert seen and all(d == torch.float32 for d in seen)  # standardized in fp32, cast by conv
    for p in model.parameters():
        assert torch.isfinite(p).all()


def test_half_model_small_weights_train_where_the_seed_formula_gives_nan() -> None:
    """eps outside the sqrt, computed in fp16 (as the paper's code under apex O2 / .half()),
    overflows in the backward; wsconvert keeps the statistics and the backward in fp32."""
    torch.manual_seed(0)
    w = (torch.randn(8, 3, 3, 3) * 1e-3).half().requires_grad_()
    x = torch.randn(2, 3, 8, 8).half()
    try:
        F.conv2d(x, seed_paper(w)).float().square().mean().backward()
    except RuntimeError:
        pytest.skip("fp16 conv2d is not implemented on this CPU build")
    assert w.grad is not None and not torch.isfinite(w.grad).all()
    layer = nn.Conv2d(3, 8, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w.detach().float())
    apply_ws(layer.half(), "paper", inplace=True)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-4)
    for _ in range(3):
        loss = layer(x).float().square().mean()
        opt.zero_grad()
        loss.backward()
        grad = trainable_weight(layer).grad
        assert grad is not None and torch.isfinite(grad).all()
        opt.step()
    assert torch.isfinite(layer.weight).all()


# ------------------------------------------------------------------------------------------ DDP


STEPS, GLOBAL_BATCH = 3, 8


def _ddp_worker(rank: int, world: int, store: str, out: str, use_accumulate: bool) -> None:
    import datetime
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    # Rendezvous through a file, not a TCP port chosen in the parent: a port found free there
    # can be taken by another process (another test run on the machine, or gloo's own
    # ephemeral connections) before rank 0 binds it, seconds later, after spawning. Gloo's
    # transport binds its own ephemeral loopback ports, with no such window.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        model = DDP(ws_net("paper", init="scale"))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        per_rank = GLOBAL_BATCH // world
        for i in range(STEPS):
            x, t = batch(GLOBAL_BATCH, seed=i)
            mine = slice(rank * per_rank, (rank + 1) * per_rank)
            x, t = x[mine], t[mine]
            opt.zero_grad()
            if use_accumulate:
                # Two micro-batches per rank. The gradients reach the weights on the exit of
                # accumulate, outside a DDP-prepared backward: no_sync, then all-reduce by hand.
                half = per_rank // 2
                with accumulate(model.module), model.no_sync():
                    F.cross_entropy(model(x[:half]), t[:half]).div(2).backward()
                    F.cross_entropy(model(x[half:]), t[half:]).div(2).backward()
                for p in model.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad.div_(world)
            else:
                F.cross_entropy(model(x), t).backward()
            opt.step()
        if rank == 0:
            torch.save(model.module.state_dict(), out)
        # Leave together: a rank tearing down its gloo pairs while the other still uses them
        # (rank 0 saving) can abort the process at exit ("terminate called without an active
        # exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _single_process_reference() -> dict[str, torch.Tensor]:
    model = ws_net("paper", init="scale")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i in range(STEPS):
        x, t = batch(GLOBAL_BATCH, seed=i)
        opt.zero_grad()
        F.cross_entropy(model(x), t).backward()
        opt.step()
    return model.state_dict()


@pytest.mark.parametrize("use_accumulate", [False, True], ids=["plain-step", "accumulate"])
def test_ddp_two_processes_equal_one_process(tmp_path: Path, use_accumulate: bool) -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path / "rank0.pt"
    store = tmp_path / "rendezvous"  # fresh per test: FileStore needs a file nobody used
    mp.spawn(_ddp_worker, args=(2, str(store), str(out), use_accumulate), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    want = _single_process_reference()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=k)
    assert not torch.equal(want["0.parametrizations.weight.original"],
                           ws_net("paper", init="scale").state_dict()[
                               "0.parametrizations.weight.original"])  # it did train


# -------------------------------------------------------------------------------- torch.compile


def _compile_matches_eager(backend: str, convention: str = "timm", init: str = "scale") -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = ws_net(convention, init=init)
    compiled_src = copy.deepcopy(eager)
    # One graph: a per-channel gain must not split it (no data-dependent branch in the layer).
    compiled = torch.compile(compiled_src, backend=backend, fullgraph=True)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(compiled_src.parameters(), lr=0.1)
    graphs_after_first = None
    for i in range(3):
        x, t = batch(seed=i)
        out_e, out_c = eager(x), compiled(x)
        torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-4)
        F.cross_entropy(out_e, t).backward()
        F.cross_entropy(out_c, t).backward()
        for (name, pe), pc in zip(eager.named_parameters(), compiled_src.parameters(),
                                  strict=True):
            assert pe.grad is not None and pc.grad is not None
            torch.testing.assert_close(pc.grad, pe.grad, atol=1e-5, rtol=1e-4, msg=name)
        for opt in (opt_e, opt_c):
            opt.step()
            opt.zero_grad()
        if graphs_after_first is None:
            graphs_after_first = counters["stats"]["unique_graphs"]
    assert graphs_after_first is not None and graphs_after_first >= 1
    assert counters["stats"]["unique_graphs"] == graphs_after_first, "recompiled during training"
    torch._dynamo.reset()


@pytest.mark.parametrize(("convention", "init"), [("timm", "scale"), ("paper", "exact"),
                                                  ("scaled", "plain"), ("paper", "plain")])
def test_compile_aot_eager_matches_eager_without_recompiling(convention: str, init: str) -> None:
    """Dynamo + AOTAutograd trace the fused WS Function (no C++ compiler needed)."""
    _compile_matches_eager("aot_eager", convention, init)


@pytest.mark.slow
def test_compile_inductor_matches_eager_without_recompiling() -> None:
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile's default (inductor) backend needs a C++ compiler; none found")
    _compile_matches_eager("inductor")


def test_compiled_eval_matches_eager_and_follows_weight_updates() -> None:
    """Under torch.compile the WS layer recomputes inside the graph; the eager cache and the
    compiled graph agree before and after an optimizer step."""
    import torch._dynamo

    torch._dynamo.reset()
    model = ws_net("scaled", init="scale").eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x, _ = batch(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    F.cross_entropy(model(x), batch(seed=5)[1]).backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        eager = model(x)
        torch.testing.assert_close(compiled(x), eager, atol=1e-5, rtol=1e-4)
        fresh = copy.deepcopy(model)  # no cache carried over: computes from the weights
        torch.testing.assert_close(fresh(x), eager, rtol=0, atol=0)
    torch._dynamo.reset()


# ------------------------------------------------------- state dicts, copies, optimizers, dtypes


def test_state_dict_round_trip_into_a_fresh_ws_model() -> None:
    model = ws_net("scaled")
    train(model, steps=2)
    fresh = ws_net("scaled", seed=123)
    fresh.load_state_dict(model.state_dict())
    x, _ = batch(seed=9)
    model.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert "0.parametrizations.weight.original" in model.state_dict()
    assert "0.parametrizations.weight.0.gain" in model.state_dict()


def test_deepcopy_is_independent() -> None:
    model = ws_net("paper")
    twin = copy.deepcopy(model)
    x, _ = batch(seed=3)
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    before = model[0].weight.detach().clone()
    train(twin, steps=2)
    torch.testing.assert_close(model[0].weight, before, rtol=0, atol=0)
    assert not torch.equal(twin[0].weight, before)
    assert trainable_weight(twin[0]) is not trainable_weight(model[0])


def test_optimizer_built_before_apply_ws_still_trains_the_layer() -> None:
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    held = model[0].weight
    apply_ws(model, "bit", inplace=True)
    assert trainable_weight(model[0]) is held  # the optimizer's Parameter is the trainable one
    before = model[0].weight.detach().clone()
    x, t = batch()
    F.cross_entropy(model(x), t).backward()
    opt.step()
    assert held.grad is not None
    assert not torch.equal(model[0].weight, before)
    rows = model[0].weight.detach().reshape(8, -1)
    torch.testing.assert_close(rows.mean(1), torch.zeros(8), atol=1e-5, rtol=0)


def test_optimizer_state_dict_round_trip() -> None:
    model = ws_net("tf")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, t = batch()
    F.cross_entropy(model(x), t).backward()
    opt.step()
    twin = ws_net("tf", seed=5)
    twin.load_state_dict(model.state_dict())
    opt2 = torch.optim.Adam(twin.parameters(), lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if saved and loaded
    for m in (model, twin):
        m.zero_grad()
        F.cross_entropy(m(x), t).backward()
    opt.step()
    opt2.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_model_to_float64_and_bfloat16() -> None:
    model = ws_net("scaled", init="exact")
    x, _ = batch(seed=4)
    model.eval()
    ref = model(x)
    model.to(torch.float64)
    assert model[0].weight.dtype == torch.float64
    p = ws_parametrization(model[0])
    assert p is not None and p.gain is not None and p.gain.dtype == torch.float64
    assert p.gamma is not None and p.gamma.dtype == torch.float64
    out64 = model(x.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), ref, atol=1e-4, rtol=1e-4)
    losses = train(model.train().to(torch.bfloat16).float(), steps=2)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses)
    model.to(torch.bfloat16)
    assert model[0].weight.dtype == torch.bfloat16
    assert model(x.bfloat16()).dtype == torch.bfloat16
