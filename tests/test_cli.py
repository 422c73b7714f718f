"""The ``crystalfit demo`` command end to end, at tiny settings."""
import json

import ase.io
import pytest

from crystalfit.cli import main


def test_demo_writes_results_structures_and_png(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--n-train", "32", "--epochs", "1", "--steps", "3", "--n-samples", "2", "--threads", "1", "--candidates", "2",
               "--ranked-samples", "1", "--step-lr", "3e-5", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Table 1" in printed and "crystal-2" in printed
    res = json.loads((out / "results.json").read_text())
    for key in ("guided", "unguided", "guided_site_exchange", "unguided_site_exchange"):
        assert set(res[key]) == {"crystal-1", "crystal-2"}
        assert all(0.0 <= v <= 1.0 for v in res[key].values())
    assert set(res["guided_ranked"]) == {"crystal-1", "crystal-2"} and "best of 2" in printed
    assert res["settings"]["n_train"] == 32 and res["settings"]["n_samples"] == 2
    assert res["settings"]["step_lr"] == 3e-5  # read back from the fitted model, so the option reached it
    assert res["settings"]["epochs"] == 1 and res["settings"]["ranked_samples"] == 1
    assert res["settings"]["network"]["lmax"] == 1  # the toy preset's network
    # options left unset keep the preset's sampler: guided corrector, gradient without the network Jacobian
    assert res["settings"]["guide_corrector"] is True and res["settings"]["guidance_jacobian"] is False
    assert res["settings"]["score_ratio"] == 1.5 and res["settings"]["n_steps"] == 3
    assert res["seconds"]["total"] >= res["seconds"]["fit"] > 0
    assert "+exchange" in printed and res["seconds"]["per_structure_site_exchange"] > 0
    for name in ("crystal-1", "crystal-2"):
        frames = ase.io.read(out / f"guided_{name}.extxyz", index=":")
        assert len(frames) == 2 and sorted(frames[0].get_chemical_symbols()) == ["Co", "N", "N", "O", "Tl"]
        assert (out / f"guided_{name}_0.cif").stat().st_size > 0
        refined = ase.io.read(out / f"guided_site_exchange_{name}.extxyz", index=":")
        assert [a.get_chemical_symbols() for a in refined] == [a.get_chemical_symbols() for a in frames]
    assert len(ase.io.read(out / "unguided.extxyz", index=":")) == 2
    assert (out / "intensities.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_guidance_switches_reach_the_model(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--n-train", "16", "--epochs", "1", "--steps", "2", "--n-samples", "1", "--threads", "1",
               "--candidates", "1", "--no-guide-corrector", "--guidance-jacobian", "--score-ratio", "4",
               "--output", str(out)])
    assert rc == 0
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["guide_corrector"] is False and settings["guidance_jacobian"] is True
    assert settings["score_ratio"] == 4.0 and "score ratio 1:4" in capsys.readouterr().out


def test_demo_rejects_unknown_option(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--no-such-option"])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_demo_rejects_no_ranked_samples(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--ranked-samples", "0"])
    assert "--ranked-samples must be >= 1, got 0" in capsys.readouterr().err
