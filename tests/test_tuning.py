"""adaptive-l2-tune: a tiny study continued, pruning, failures, the space checks, submitit workers;
the table's jobs through submitit's local executor."""
import csv
import json
import os

import pytest
from conftest import (SYNTHETIC_BASE, TINY_DATASET, TINY_TRAINING, TINY_VALIDATION, read_results,
                      tiny_opts)

from adaptive_l2.cli.tune import main as tune_main

ADAPTIVE = os.path.join(os.path.dirname(SYNTHETIC_BASE), "adaptive_l2.yml")
ONE_EVAL_PER_EPOCH = ["TEST.EVAL_PERIOD", "1"]


def _tune(dataset_root, out, *args, trials=1, opts=()):
    return tune_main(["--config-file", ADAPTIVE, "--trials", str(trials), "--output-dir", str(out),
                      *args, *tiny_opts(dataset_root, "unused", *TINY_VALIDATION, *opts)])


def _trials(out):
    with open(os.path.join(out, "trials.csv")) as handle:
        return list(csv.DictReader(handle))


def test_tiny_study_continues_prunes_and_tests_the_best_trial_once(dataset_root, tmp_path,
                                                                    capsys):
    out = tmp_path / "study"
    # no pruning at first (the median pruner may stop trial 2, whose first evaluation is about
    # the same as the others': tiny runs differ little)
    # a seeded sampler: the same two amplitudes (and so two different mAPs) on every run
    assert _tune(dataset_root, out, "--pruner", "none", "--sampler-seed", "2", trials=2,
                 opts=ONE_EVAL_PER_EPOCH) == 0
    first = _trials(out)
    assert [row["state"] for row in first] == ["COMPLETE", "COMPLETE"]
    # continued (same storage + name) with a pruner that must prune: mAP is at most 100, so the
    # new trial falls below the threshold at its first evaluation
    assert _tune(dataset_root, out, "--pruner", "threshold:101", "--sampler-seed", "2",
                 opts=ONE_EVAL_PER_EPOCH) == 0
    rows = _trials(out)
    assert len(rows) == 3 and rows[:2] == first  # earlier trials kept as they were
    pruned = rows[2]
    assert pruned["state"] == "PRUNED" and pruned["note"].startswith("pruned at epoch 1: mAP")
    pruned_dir = out / "trial_0002"
    assert (pruned_dir / "last_checkpoint").is_file()  # resumable as any interrupted run
    assert not (pruned_dir / "final_results.json").exists()
    with open(pruned_dir / "eval_history.jsonl") as handle:
        assert [json.loads(line)["epoch"] for line in handle] == [1]
    for row in rows[:2]:
        trial_dir = row["output_dir"]
        assert trial_dir == str(out / f"trial_{int(row['number']):04d}")
        # the objective is the final evaluation of the run, on the validation split
        assert float(row["value"]) == pytest.approx(read_results(trial_dir)["mAP"])
        with open(os.path.join(trial_dir, "log.txt")) as handle:
            log = handle.read()
        assert "4 of 10 training identities held out" in log
        assert "Evaluation results for validation" in log
        assert log.count("Starting training from epoch 0") == 1  # no other trial's messages
    with open(out / "best.json") as handle:
        best = json.load(handle)
    assert best["trials"]["COMPLETE"] == 2 and best["trials"]["PRUNED"] == 1
    best_row = max(rows[:2], key=lambda row: float(row["value"]))
    assert best["validation_mAP"] == pytest.approx(float(best_row["value"]))
    assert best["params"]["MODEL.REG.AMPLITUDE"] == pytest.approx(
        float(best_row["MODEL.REG.AMPLITUDE"]))
    test_dir = out / f"test_of_trial_{best['best_trial']:04d}"
    assert best["test"] == read_results(test_dir)  # the test set, evaluated from model_final
    with open(test_dir / "log.txt") as handle:
        test_log = handle.read()
    assert "Evaluation results for SyntheticReID" in test_log and "held out" not in test_log
    assert test_log.count("Start inference") == 1  # evaluated once, not again when continued
    for name in ("optimization_history.png", "param_importances.png"):
        assert (out / name).stat().st_size > 1000
    assert "best trial" in capsys.readouterr().out


def test_a_failing_trial_is_marked_failed_with_its_error(dataset_root, tmp_path):
    out = tmp_path / "failing"
    space = tmp_path / "space.yml"
    space.write_text("SOLVER.BASE_LR: {low: 1.0e+6, high: 1.0e+7, log: true}\n")
    assert _tune(dataset_root, out, "--space", str(space), trials=2) == 1
    rows = _trials(out)
    assert [row["state"] for row in rows] == ["FAIL", "FAIL"]  # the study went on after a failure
    assert all(row["note"].startswith("FloatingPointError:") for row in rows)


@pytest.mark.parametrize("space, message", [
    ("MODEL.REG.AMPLITUD: {low: 0.001, high: 0.1}", "unknown config key 'MODEL.REG.AMPLITUD'"),
    ("MODEL.REG.AMPLITUDE: {low: 0.001, hihg: 0.1}", r"MODEL.REG.AMPLITUDE: unknown field\(s\) \['hihg'\]"),
    ("MODEL.REG.AMPLITUDE: {low: 0.1, high: 0.001}", "MODEL.REG.AMPLITUDE: needs low < high"),
    ("MODEL.REG.AMPLITUDE: {low: 0.001, high: 0.1, log: true, step: 0.001}",
     "MODEL.REG.AMPLITUDE: 'step' cannot be combined with 'log'"),
    ("MODEL.REG.SGP.ALPHA: {low: 0.1, high: 1}", "MODEL.REG.SGP.ALPHA changes nothing unless the "
                                                 "config sets MODEL.REG.SGP.ENABLED True"),
])
def test_a_bad_search_space_is_refused_naming_the_key(tmp_path, space, message):
    from adaptive_l2.config import load_config
    from adaptive_l2.tune.space import parse_space
    import yaml

    with pytest.raises((KeyError, ValueError), match=message):
        parse_space(yaml.safe_load(space), load_config(ADAPTIVE), "space.yml")


def test_the_cli_refuses_a_space_for_a_term_the_config_leaves_off(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tune_main(["--config-file", SYNTHETIC_BASE, "--output-dir", str(tmp_path),
                   "--space-preset", "amplitude"])
    assert "MODEL.REG.AMPLITUDE changes nothing unless the config sets MODEL.REG.NAME " \
           "adaptive" in capsys.readouterr().err


def test_two_submitit_workers_share_one_study(dataset_root, tmp_path):
    out = tmp_path / "workers"
    assert _tune(dataset_root, out, "--workers", "2", trials=2) == 0
    rows = _trials(out)
    assert sorted(row["state"] for row in rows) == ["COMPLETE", "COMPLETE"]
    job_logs = [name for name in os.listdir(out / "jobs") if name.endswith("_log.out")]
    assert len(job_logs) == 2  # one submitit job per worker


def test_slurm_jobs_get_the_requested_resources(tmp_path, monkeypatch):
    """The sbatch script submitit would submit (an `srun` stand-in makes it believe in Slurm)."""
    from adaptive_l2.cluster import make_executor, parse_slurm_params

    with pytest.raises(RuntimeError, match="--launcher slurm: no Slurm on this machine"):
        monkeypatch.setenv("PATH", str(tmp_path))
        make_executor("slurm", str(tmp_path), job_name="t", partition="gpu")
    (tmp_path / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "srun").chmod(0o755)
    executor = make_executor("slurm", str(tmp_path / "jobs"), job_name="rows", partition="gpu",
                             gpus_per_job=2, cpus_per_job=6, time_minutes=90,
                             slurm_params=parse_slurm_params(["account=abc"]))
    script = executor._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--partition=gpu", "--gpus-per-node=2", "--cpus-per-task=6", "--time=90",
                 "--account=abc", "--job-name=rows"):
        assert f"#SBATCH {line}\n" in script
    with pytest.raises(ValueError, match="--slurm-param 'account': expected KEY=VALUE"):
        parse_slurm_params(["account"])
    with pytest.raises(ValueError, match="--partition is required"):
        make_executor("slurm", str(tmp_path), job_name="t")


def test_the_tools_refuse_slurm_without_a_partition_before_anything_starts(tmp_path, capsys):
    from adaptive_l2.cli.table import main as table_main

    assert table_main(["--suite", "paper", "--launcher", "slurm",
                       "--output-root", str(tmp_path / "table")]) == 2
    assert "--partition is required with --launcher slurm" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tune_main(["--config-file", ADAPTIVE, "--output-dir", str(tmp_path / "tune"),
                   "--launcher", "slurm", "--workers", "2"])
    assert "--partition is required with --launcher slurm" in capsys.readouterr().err
    assert not (tmp_path / "tune").exists() and not (tmp_path / "table").exists()


def test_table_rows_as_local_submitit_jobs_dagger_row_in_its_rows_job(dataset_root, tmp_path,
                                                                      monkeypatch):
    from adaptive_l2.cluster import make_executor, submit_table, table_job_groups, wait_for
    from adaptive_l2.table.suite import Row

    monkeypatch.chdir(tmp_path)
    base = Row("Tiny", "base", SYNTHETIC_BASE)
    rerank = Row("Tiny", "base_rerank", SYNTHETIC_BASE, evaluates="base")
    other = Row("Tiny", "other", SYNTHETIC_BASE)
    assert table_job_groups([rerank, other]) == [[rerank], [other]]  # its row not submitted
    rows = [base, rerank]
    assert table_job_groups(rows) == [[base, rerank]]
    opts = [*TINY_DATASET, *TINY_TRAINING, "DATASETS.ROOT", dataset_root]
    executor = make_executor("local", str(tmp_path / "jobs"), job_name="rows", time_minutes=10)
    jobs = submit_table(rows, "logs", opts, 1, executor)
    assert len(jobs) == 1 and jobs[0].rows == ["Tiny/base", "Tiny/base_rerank"]
    assert wait_for(jobs, lambda job: "rows") == []
    trained, evaluated = (read_results(tmp_path / "logs" / "Tiny" / name)
                          for name in ("base", "base_rerank"))
    assert evaluated["mAP"] == pytest.approx(trained["mAP"])  # the same final model, evaluated
    with open(tmp_path / "logs" / "Tiny" / "base_rerank" / "console.txt") as handle:
        assert "--eval-only MODEL.WEIGHTS logs/Tiny/base/model_final.pth" in handle.read()
    assert submit_table(rows, "logs", opts, 1, executor) == []  # finished rows are kept


def test_report_without_importances_when_every_trial_ties(tmp_path):
    """Two complete trials with the same value (a tiny run often gives the same mAP): fANOVA
    cannot rank parameters on a target without variance; the report is written without that
    plot instead of failing after the whole study (seen once in CI)."""
    import optuna

    from adaptive_l2.tune.study import write_plots

    study = optuna.create_study(direction="maximize")
    space = {"MODEL.REG.AMPLITUDE": optuna.distributions.FloatDistribution(1e-4, 0.1, log=True)}
    for amplitude in (2e-4, 3e-4):
        study.add_trial(optuna.trial.create_trial(params={"MODEL.REG.AMPLITUDE": amplitude},
                                                  distributions=space, value=41.5))
    written = write_plots(study, str(tmp_path))
    assert [os.path.basename(path) for path in written] == ["optimization_history.png"]
    study.add_trial(optuna.trial.create_trial(params={"MODEL.REG.AMPLITUDE": 0.01},
                                              distributions=space, value=45.0))
    assert len(write_plots(study, str(tmp_path))) == 2


def test_a_seeded_sampler_repeats_its_proposals_but_not_in_a_continued_study(tmp_path):
    import optuna

    from adaptive_l2.tune.study import StudySettings, default_storage, open_study

    distributions = {"MODEL.REG.AMPLITUDE": optuna.distributions.FloatDistribution(
        1e-4, 0.1, log=True)}

    def first_proposal(folder, seed):
        settings = StudySettings(config_file=ADAPTIVE, opts=[], output_dir=str(folder),
                                 study_name="s", storage=default_storage(str(folder)),
                                 sampler_seed=seed)
        study = open_study(settings, create=True)
        trial = study.ask(distributions)
        study.tell(trial, 1.0)
        return trial.params["MODEL.REG.AMPLITUDE"], settings

    folder_a, folder_b = tmp_path / "a", tmp_path / "b"
    folder_a.mkdir(), folder_b.mkdir()
    a, settings = first_proposal(folder_a, 0)
    assert first_proposal(folder_b, 0)[0] == a
    assert first_proposal(tmp_path / "a", 0)[0] != a  # continued: keyed by the trials so far
    with pytest.raises(SystemExit):
        tune_main(["--config-file", ADAPTIVE, "--output-dir", str(tmp_path / "c"),
                   "--sampler-seed", "0", "--workers", "2"])
