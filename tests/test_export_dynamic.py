"""Export of real-world graph shapes with a dynamic batch, and dependency errors as one line.

The ConvNeXt-like model below (channels-last LayerNorm: permute, LayerNorm, permute; depthwise
7x7; MLP on the channels-last tensor; layer scale) is the shape that made torch.export fail with
"Invalid ranges [2:1]" when a dynamic batch was traced at batch 1.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from wsconvert.errors import UsageError, WsconvertError
from wsconvert.export import (
    DYNAMIC_TRACE_BATCH,
    ExportConfig,
    dependency_reason,
    export_onnx,
    strip_ansi,
    trace_batch,
)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW tensor, as torchvision / timm ConvNeXt write it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 4 * c)
        self.fc2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))).permute(0, 3, 1, 2)
        return x + self.gamma * y


class TinyConvNeXt(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 4, stride=4), LayerNorm2d(c))
        self.block1 = Block(c)
        self.down = nn.Sequential(LayerNorm2d(c), nn.Conv2d(c, 2 * c, 2, stride=2))
        self.block2 = Block(2 * c)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.LayerNorm(2 * c),
                                  nn.Linear(2 * c, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.down(self.block1(self.stem(x)))))


class Unexportable(nn.Module):
    """An op the ONNX exporter has no translation for."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y.mean() + torch.linalg.eigvals(y[0, 0]).real.sum()


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def test_trace_batch_never_one_when_dynamic() -> None:
    assert trace_batch(ExportConfig(((1, 3, 8, 8),), dynamic_batch=True)) == DYNAMIC_TRACE_BATCH
    assert DYNAMIC_TRACE_BATCH == 2
    assert trace_batch(ExportConfig(((1, 3, 8, 8),))) is None  # static: the shape asked for
    assert trace_batch(ExportConfig(((3, 3, 8, 8),), dynamic_batch=True)) is None
    two = ExportConfig(((1, 3, 8, 8), (1, 4)), dynamic_batch=True)
    assert trace_batch(two) == 2


def test_channels_last_layernorm_dynamic_batch_from_batch_one(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyConvNeXt().eval()
    out = tmp_path / "cnx.onnx"
    result = export_onnx(model, out, ExportConfig(((1, 3, 32, 32),), dynamic_batch=True))
    assert result.op_histogram["Conv"] == 4
    import onnx

    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # symbolic batch
    for batch in (1, 2, 5):  # the shape's batch, the trace batch, another one
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref = model(x).numpy()
        got = _run(out, x)
        assert got.shape == ref.shape == (batch, 5)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_static_export_keeps_the_batch_asked_for(tmp_path: Path) -> None:
    model = TinyConvNeXt().eval()
    out = tmp_path / "static.onnx"
    export_onnx(model, out, ExportConfig(((1, 3, 32, 32),)))
    import onnx

    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1


def test_model_that_only_runs_at_batch_one_is_refused(tmp_path: Path) -> None:
    class BatchOne(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).view(4, 36).sum(1, keepdim=True)  # needs batch 1

    with pytest.raises(UsageError, match="does not run at batch 2") as err:
        export_onnx(BatchOne(), tmp_path / "b.onnx",
                    ExportConfig(((1, 3, 8, 8),), dynamic_batch=True))
    assert "\n" not in str(err.value)
    assert f"the model BatchOne ({__name__}) does not run at batch 2" in str(err.value)
    # The model's own error is the reason, not the exporter's (the probe runs after the export
    # failed, outside its handler, so nothing chains the two).
    assert str(err.value).endswith("is invalid for input of size 288"), str(err.value)
    assert not list(tmp_path.iterdir())
    # Without a dynamic batch it exports as before.
    export_onnx(BatchOne(), tmp_path / "b.onnx", ExportConfig(((1, 3, 8, 8),)))


def test_strip_ansi() -> None:
    coloured = "Failed. \x1b[96mThis is step 1/3\x1b[0m of \x1b[1;31mexport\x1b[0m\x1b[K done"
    assert strip_ansi(coloured) == "Failed. This is step 1/3 of export done"
    assert strip_ansi("plain [not] an escape") == "plain [not] an escape"


def test_dependency_reason_names_the_innermost_cause_on_one_line() -> None:
    try:
        try:
            raise ValueError("\x1b[31mInvalid ranges [2:1]\x1b[0m\nsecond line")
        except ValueError as inner:
            raise RuntimeError("Failed to export. \x1b[96mThis is step 1/3\x1b[0m. Next steps:"
                               "\n- try this") from inner
    except RuntimeError as exc:
        reason = dependency_reason(exc)
    assert reason == "Failed to export. This is step 1/3. (ValueError: Invalid ranges [2:1])"
    assert dependency_reason(RuntimeError("x" * 500), limit=50) == "x" * 47 + "..."
    assert dependency_reason(RuntimeError()) == "RuntimeError"


def test_exporter_failure_is_one_clean_line_and_logs_stay_quiet(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    seen: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    catcher = Catch(level=logging.DEBUG)
    logging.getLogger().addHandler(catcher)
    before = logging.getLogger("torch").level
    try:
        with pytest.raises(WsconvertError) as err:
            export_onnx(Unexportable(), tmp_path / "u.onnx",
                        ExportConfig(((1, 3, 8, 8),), dynamic_batch=True))
    finally:
        logging.getLogger().removeHandler(catcher)
    message = str(err.value)
    assert type(err.value) is WsconvertError and err.value.exit_code == 2
    assert message.startswith(f"Unexportable ({__name__}): ONNX export failed: ")
    assert "linalg_eig" in message
    assert "\x1b" not in message and "\n" not in message
    assert not [r for r in seen if r.name.split(".")[0] in ("torch", "onnxscript", "onnx_ir")]
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert logging.getLogger("torch").level == before  # levels restored
    assert not list(tmp_path.iterdir())


def test_cli_error_line_keeps_dependency_text_and_drops_colour(
        capsys: pytest.CaptureFixture[str]) -> None:
    from wsconvert.cli._common import _error_line

    _error_line("ONNX export failed: [torch.onnx] \x1b[96mstep 1/3\x1b[0m (Invalid ranges "
                "[2:1]) list[int]\n  second line")
    err = capsys.readouterr().err
    assert err == ("error: ONNX export failed: [torch.onnx] step 1/3 (Invalid ranges [2:1]) "
                   "list[int] second line\n")
