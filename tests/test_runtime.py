"""The precision policy: CPU flags (and whether an int8 model exists) -> the choice and the flag that decided."""

import pytest
import torch

from resmemnet import runtime
from resmemnet.runtime import choose_precision

XEON_VNNI = {"avx512f", "avx512_vnni"}  # the maintainers' machine: VNNI, no bf16
EPYC = {"avx512f", "avx512_vnni", "avx512_bf16"}
SAPPHIRE_RAPIDS = {"avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}
ALDER_LAKE = {"avx2", "avx_vnni"}
OLD = {"avx2"}


@pytest.mark.parametrize(("flags", "int8", "name", "decided_by"), [
    (XEON_VNNI, True, "int8", "avx512_vnni"),
    (XEON_VNNI, False, "fp32", "no native bf16"),
    (EPYC, True, "int8", "avx512_vnni"),
    (EPYC, False, "bf16", "avx512_bf16"),
    (SAPPHIRE_RAPIDS, True, "int8", "amx_int8"),
    (SAPPHIRE_RAPIDS, False, "bf16", "amx_bf16"),
    (ALDER_LAKE, True, "int8", "avx_vnni"),
    (OLD, True, "fp32", "int8 model unused"),
    (OLD, False, "fp32", "no native bf16"),
    (set(), True, "fp32", "int8 model unused"),
])
def test_auto_follows_the_cpu_flags(monkeypatch, flags, int8, name, decided_by):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
    choice = choose_precision("auto", "cpu", int8=int8)
    assert choice.name == name and decided_by in choice.reason
    assert choice.dtype == {"int8": None, "fp32": None, "bf16": torch.bfloat16}[name]


def test_a_gpu_gets_fp16_even_with_an_int8_model(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(SAPPHIRE_RAPIDS))
    assert choose_precision("auto", "cuda", int8=True).name == "fp16"


def test_a_requested_precision_overrides_the_flags(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(OLD))
    assert choose_precision("bf16", "cpu") == runtime.PrecisionChoice("bf16", "requested")
    assert choose_precision("int8", "cpu", int8=True).name == "int8"
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(SAPPHIRE_RAPIDS))
    assert choose_precision("fp32", "cpu", int8=True).name == "fp32"


def test_int8_without_an_int8_model_says_how_to_make_one():
    with pytest.raises(ValueError, match=r"needs an int8 model; make one with `resmemnet export --format onnx --int8"):
        choose_precision("int8", "cpu")
    with pytest.raises(ValueError, match="Unknown precision 'int4'"):
        choose_precision("int4", "cpu")


def test_info_says_which_precision_this_machine_gets_and_why(monkeypatch, capsys):
    from resmemnet.cli import main

    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(EPYC))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["info", "--backbone", "mobilenet_v3_large"]) == 0
    assert "precision: bf16 (CPU computes bf16 natively (avx512_bf16))" in capsys.readouterr().out
