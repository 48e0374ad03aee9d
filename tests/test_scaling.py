"""`dtlab scale`: power-law fits, the derived columns, the plots, and a resumable grid of real fits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dtlab.scaling import Cell, add_derived, fit_power_law, plot, read_rows, run_grid

CONF = Path(__file__).parents[1] / "conf"


@pytest.mark.parametrize(("a", "alpha", "c"), [(50.0, 0.3, 0.1), (8.0, 0.076, 0.0), (3.0, 0.2, 0.05)])
def test_power_law_fit_recovers_the_exponent(a, alpha, c):
    x = np.geomspace(1e5, 3e7, 6)
    y = a * x**-alpha + c
    got = fit_power_law(x, y * (1 + 0.002 * np.random.default_rng(0).standard_normal(6)))
    assert got[1] == pytest.approx(alpha, rel=0.15) and got[2] == pytest.approx(c, abs=0.05 * y.min() + 0.01)
    with pytest.raises(ValueError, match="3 or more distinct sizes"):
        fit_power_law(x[:2], y[:2])
    with pytest.raises(ValueError, match="does not fall with size"):
        fit_power_law(x, y[::-1])


def synthetic_rows() -> list[dict]:
    """Three sizes × two data fractions × devices 1, 2 × two seeds, loss = 40·N^−0.25 + 0.05·(1/f) + 0.02."""
    rows = []
    for f in (0.5, 1.0):
        for width, n in ((32, 2e4), (64, 8e4), (128, 3.2e5)):
            for seed in (0, 1):
                for d in (1, 2):
                    loss = 40 * n**-0.25 + 0.05 / f + 0.02 + 1e-4 * seed
                    rows.append(
                        {"cell": f"{f}-{width}-{seed}-{d}", "status": "ok", "devices": d, "size": json.dumps({"embed_dim": width}), "batch_size": 64}
                        | {"fraction": f, "seed": seed, "transitions": int(6000 * f), "parameters": int(n), "samples_per_s": 1000.0 * d**0.8 * (1 + seed)}
                        | {"train/dt_loss": loss, "normalized_score": 50 + width / 10}
                    )
    return rows


def test_derived_columns_and_plots(tmp_path):
    rows = synthetic_rows()
    assert add_derived(rows, None) == "dt_loss"
    for r in rows:
        assert r["train_loss"] == r["train/dt_loss"]
        # efficiency compares with the one-device cell of the same size, batch, fraction and seed
        assert r["efficiency"] == pytest.approx(r["devices"] ** 0.8 / r["devices"])
    files, fits = plot(rows, tmp_path, "synthetic", "dt_loss")
    assert {p.name for p in files} == {"throughput.png", "loss_vs_parameters.png", "loss_vs_data.png", "score_vs_parameters.png"}
    assert all(p.stat().st_size > 10_000 for p in files)
    by_params = {k: v for k, v in fits.items() if "vs parameters" in k}
    assert len(by_params) == 2 and all(v["alpha"] == pytest.approx(0.25, rel=0.1) for v in by_params.values())
    assert not [k for k in fits if "vs transitions" in k], "two fractions: too few points for a fit"


def test_a_failed_cell_says_why_and_the_grid_goes_on(pendulum_id, tmp_path):
    bad = Cell(devices=1, size={"no_such_option": 1}, batch_size=16, fraction=1.0, seed=0)
    path, _, _ = run_grid(str(CONF / "bc.yaml"), tmp_path, [bad], updates=4, fit_args=["--data.dataset_id", pendulum_id])
    (row,) = read_rows(path)
    assert row["status"].startswith("failed (exit") and "no_such_option" in row["status"] and "log:" in row["status"]


def test_scale_runs_a_resumable_grid_of_real_fits(pendulum_id, tmp_path, capsys):
    """`dtlab scale` with devices [1] then [1, 2]: the second call runs only the new 2-process cell (the
    grid resumes), and the CSV holds measured throughput, efficiency, memory, parameters and loss."""
    from dtlab.cli import main

    common = [str(CONF / "bc.yaml"), "--out", str(tmp_path), "--updates", "20", "--batch_sizes", "[16]"]
    common += ["--sizes", '[{"hidden_dims": [16, 16]}]', "--fit_args", json.dumps(["--data.dataset_id", pendulum_id])]
    main(["scale", *common, "--devices", "[1]"])
    main(["scale", *common, "--devices", "[1, 2]"])
    out = capsys.readouterr().out
    assert "1 of 2 cells already done" in out
    rows = read_rows(tmp_path / "scaling.csv")
    assert [(r["devices"], r["status"]) for r in rows] == [(1, "ok"), (2, "ok")], rows
    one, two = rows
    assert one["efficiency"] == pytest.approx(1.0) and 0 < two["efficiency"] < 2
    assert two["global_batch_size"] == 32 and one["global_batch_size"] == 16
    assert one["parameters"] == two["parameters"] == 3 * 16 + 16 + 16 * 16 + 16 + 16 + 1
    assert one["samples_per_s"] == pytest.approx(one["updates_per_s"] * 16)
    assert one["peak_memory_mb"] > 50 and np.isfinite(one["train_loss"]) and one["transitions"] == 6000
    assert (tmp_path / "throughput.png").is_file()
    assert len(list((tmp_path / "runs").rglob("run_summary.json"))) == 2
