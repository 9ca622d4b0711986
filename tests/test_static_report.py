"""The SASS reading of the static report (no GPU, no compiler: SASS text given)."""

from tinylora_kernels.static_report import _dependent_loads, _loops, _parse_sass

LOOP = """
.L_x_1:
        /*0100*/                   LDG.E.U8 R4, desc[UR4][R2.64] ;
        /*0110*/                   LOP3.LUT R5, R4, 0xf, RZ, 0xc0, !PT ;
        /*0120*/                   IMAD.WIDE R6, R5, 0x4, R8 ;
        /*0130*/                   LDG.E R10, desc[UR4][R6.64] ;
        /*0140*/                   LDG.E R11, desc[UR4][R16.64] ;
        /*0150*/                   LDS R14, [R5] ;
        /*0160*/                   MOV R6, R20 ;
        /*0170*/                   LDG.E R15, desc[UR4][R6.64] ;
        /*0180*/              @P0  BRA `(.L_x_1) ;
        /*0190*/                   EXIT ;
"""


def test_a_load_whose_address_comes_from_a_loaded_value_is_a_gather():
    instrs, labels = _parse_sass(LOOP)
    (first, last), = _loops(instrs, labels)
    assert (first, last) == (0, 8)
    # R10's address is computed from the loaded byte (a table lookup), R14's too (shared);
    # R11's is not; R15's register was overwritten by a value not loaded
    assert _dependent_loads(instrs, first, last) == (1, 1)


def test_a_value_carried_around_the_loop_counts():
    text = LOOP.replace("MOV R6, R20", "IADD3 R16, R10, 0x1, RZ")
    instrs, labels = _parse_sass(text)
    # on the second trip R16 holds a loaded value, so R11's load becomes a gather too (and
    # R6 keeps the loaded address, so R15's as well)
    assert _dependent_loads(instrs, 0, 8) == (3, 1)


def test_rebuilding_an_unknown_run_is_a_usage_error(capsys):
    import pytest

    from tinylora_kernels.bench.rebuild_measured import RUNS, main

    with pytest.raises(SystemExit) as e:
        main(["--runs", "v9"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "v9" in err and all(name in err for name in RUNS)


def test_the_report_carries_its_checks_against_measurement(tmp_path):
    """Each committed check (that day's projection, the H200 suite run that measured the same
    kernels) gives measured / projected per scenario, and the report prints the band."""
    import json

    from tinylora_kernels.static_report import CHECKS, measured_checks, static_report_markdown

    date, projected_file, measured_file = CHECKS[0]
    (tmp_path / projected_file).parent.mkdir(parents=True)
    (tmp_path / measured_file).parent.mkdir(parents=True)
    (tmp_path / projected_file).write_text(json.dumps({"scenarios": {
        "decode:1": {"projected_us": 10.0}, "prefill:16": {"projected_us": 40.0}}}))
    row = lambda m, us: {"case": {"layer": "decoder_layer", "M": m, "mode": "fwd"},  # noqa: E731
                         "providers": {"fused": {"graph": {"median_us": us}}}}
    (tmp_path / measured_file).write_text(json.dumps({"rows": [row(1, 35.0), row(16, 60.0),
                                                                row(4, 99.0)]}))
    checks = measured_checks(str(tmp_path))
    assert [(c["scenario"], c["measured_over_projected"]) for c in checks] == [
        ("decode:1", 3.5), ("prefill:16", 1.5)]
    assert measured_checks(str(tmp_path / "nowhere")) == []
    text = static_report_markdown({"what": "w", "triton": "t", "scenarios": {},
                                   "checks": checks})
    assert "Not validated" in text and "1.5x–3.5x" in text
