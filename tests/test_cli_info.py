import json

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
