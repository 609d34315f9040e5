"""The sweep job's config, its points and its curve: no server, no cluster."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from pipeline.errors import ConfigError
from pipeline.jobs import load_job, parse_job
from pipeline.sweep import curve, results
from pipeline.sweep.results import PointResult
from tests.helpers import ROOT


def test_rd_sweep_yaml_points_are_the_train_job_at_each_kl_weight():
    spec = load_job(ROOT / "jobs" / "rd-sweep.yaml")
    job = spec.config
    assert spec.kind == "sweep" and spec.entrypoint.endswith("pipeline sweep jobs/rd-sweep.yaml")
    points = job.points()
    assert [p.run_name for p in points] == [
        "rd-sweep-kl0.1",
        "rd-sweep-kl0.3",
        "rd-sweep-kl1",
        "rd-sweep-kl3",
        "rd-sweep-kl10",
    ]
    tj = job.train_job(points[0])
    assert tj.optim.kl_weight == 0.1 and tj.model.latent_dim == 32
    assert tj.scaling.name == "rd-sweep-kl0.1"
    assert tj.scaling.storage_path == "s3://checkpoints/ray/rd-sweep" == job.root
    # everything else is the training job's: same data, model, workers, tracking
    train = load_job(ROOT / "jobs" / "train.yaml").config
    assert tj.data == train.data and tj.scaling.num_workers == train.scaling.num_workers
    assert tj.model.channels == train.model.channels


def _raw(**sweep) -> dict:
    return {
        "kind": "sweep",
        "entrypoint": "python -m pipeline sweep x.yaml",
        "config": {
            "data": {"train_url": "s3://d/train", "test_url": "s3://d/test"},
            "scaling": {"name": "s"},
            "sweep": sweep,
        },
    }


def test_latent_dims_make_a_grid():
    job = parse_job(_raw(kl_weights=[0.5, 2], latent_dims=[4, 16])).config
    assert [(p.run_name, p.kl_weight, p.latent_dim) for p in job.points()] == [
        ("s-kl0.5-z4", 0.5, 4),
        ("s-kl2-z4", 2.0, 4),
        ("s-kl0.5-z16", 0.5, 16),
        ("s-kl2-z16", 2.0, 16),
    ]
    assert job.train_job(job.points()[3]).model.latent_dim == 16


@pytest.mark.parametrize(
    "sweep, key, message",
    [
        ({}, "config.sweep.kl_weights", "missing required key"),
        ({"kl_weights": []}, "config.sweep.kl_weights", "at least one"),
        ({"kl_weights": [1, 1]}, "config.sweep.kl_weights", "distinct"),
        ({"kl_weights": [-1]}, "config.sweep.kl_weights[0]", "must be >= 0"),
        ({"kl_weights": [1], "max_concurrent": -1}, "config.sweep.max_concurrent", ">= 0"),
        ({"kl_weights": [1], "early_stop": {"scheduler": "pbt"}}, "scheduler", "one of"),
        ({"kl_weights": [1], "bogus": 1}, "config.sweep.bogus", "unknown key"),
    ],
)
def test_bad_sweep_sections_name_the_key(sweep, key, message):
    with pytest.raises(ConfigError) as e:
        parse_job(_raw(**sweep))
    assert key in str(e.value) and message in str(e.value)


def test_a_sweep_needs_held_out_data():
    raw = _raw(kl_weights=[1])
    del raw["config"]["data"]["test_url"]
    with pytest.raises(ConfigError, match="data.test_url"):
        parse_job(raw)


def _point(w: float, rate: float, distortion: float, status="finished") -> PointResult:
    return PointResult(
        f"s-kl{w:g}", w, 8, status, f"run{w:g}", "", rate, distortion, rate + distortion, 0.5
    )


def test_best_is_the_lowest_held_out_neg_elbo_among_finished_points():
    pts = [_point(0.1, 90, 100), _point(1, 20, 150), _point(10, 1, 200), _point(3, 5, 150, "x")]
    assert results.best(pts).name == "s-kl1"
    assert results.best([_point(1, 1, 1, "stopped")]) is None


def test_eval_terms_read_either_naming_of_the_reports():
    short = {"eval_rate_bits": 1, "eval_distortion_bits": 2, "eval_neg_elbo_bits": 3}
    grouped = {k.replace("eval_", "eval/"): v for k, v in short.items()}
    for m in (short, grouped):
        assert results.eval_terms({**m, "eval_bits_per_dim": 0.1, "step": 4}) == {
            "rate_bits": 1.0,
            "distortion_bits": 2.0,
            "neg_elbo_bits": 3.0,
            "bits_per_dim": 0.1,
        }
    assert results.eval_terms({"step": 8, "epoch": 0}) is None  # a mid-epoch report


def test_records_round_trip_and_the_curve_is_drawn(tmp_path):
    pts = [_point(10, 1, 200), _point(0.1, 90, 100), _point(1, 20, 150)]
    for p in pts:
        results.write(str(tmp_path / "points"), p)
    back = results.read_all(str(tmp_path / "points"))
    assert back == {p.name: p for p in pts}
    t = curve.table(list(back.values()))
    assert [r[0] for r in t["data"]] == ["s-kl0.1", "s-kl1", "s-kl10"]  # falling rate
    assert json.loads(json.dumps(t))["columns"][0] == "name"
    assert curve.csv(pts).splitlines()[1].startswith("s-kl0.1,0.1,8,90,100,190,")
    curve.draw(pts, tmp_path / "c.png", "t")
    with Image.open(tmp_path / "c.png") as im:
        assert im.size == (640, 480)


def test_concurrency_fits_whole_trials_and_asha_watches_held_out_neg_elbo():
    from pipeline.sweep.driver import concurrency, scheduler

    job = parse_job(_raw(kl_weights=[0.1, 1, 10])).config  # 2 workers x 1 CPU (+0.1) a trial
    assert concurrency(job, {"CPU": 4.0}) == 1 and concurrency(job, {"CPU": 8.0}) == 3
    assert concurrency(job, {"CPU": 1.0}) == 1  # never 0: Ray Train waits for the workers
    assert concurrency(parse_job(_raw(kl_weights=[1], max_concurrent=5)).config, {}) == 5
    assert scheduler(job) is None  # off by default: every point runs to the end
    raw = _raw(kl_weights=[1], early_stop={"scheduler": "asha", "grace_epochs": 2})
    asha = scheduler(parse_job(raw).config)
    assert (asha.metric, asha._mode, asha._time_attr) == ("neg_elbo_bits", "min", "epoch")
