"""The README's Python example runs as written: `Trainer(cfg)` makes OUTPUT_DIR, writes log.txt,
config.yaml and final_results.json there, and honours SEED (two runs give the same numbers)."""
import json
import os

from conftest import REPO, TINY_DATASET, TINY_TRAINING


def _readme_example(output_dir, dataset_root):
    """The README's lines, with tiny sizes merged after the YAML (as a user would override)."""
    import adaptive_l2
    from fastreid.config import get_cfg

    cfg = adaptive_l2.add_reg_config(get_cfg())
    cfg.merge_from_file("configs/Synthetic/adaptive_l2.yml")
    cfg.merge_from_list([*TINY_DATASET, *TINY_TRAINING, "DATASETS.ROOT", dataset_root,
                         "OUTPUT_DIR", str(output_dir)])
    trainer = adaptive_l2.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer.train()


def test_readme_example_writes_its_run_folder_and_repeats_with_seed(dataset_root, tmp_path,
                                                                      monkeypatch):
    monkeypatch.chdir(REPO)  # the README's relative config path, from a clone's root
    first, second = tmp_path / "nested" / "a", tmp_path / "nested" / "b"
    results_a = _readme_example(first, dataset_root)
    results_b = _readme_example(second, dataset_root)

    for name in ("log.txt", "config.yaml", "final_results.json", "model_final.pth",
                 "eval_history.jsonl", "l2_factors.jsonl"):
        assert os.path.isfile(first / name), name
    log = (first / "log.txt").read_text()
    assert "Seeded every generator with SEED 0" in log
    assert "Evaluation results" in log  # fast-reid's messages reach the file too
    with open(first / "final_results.json") as handle:
        written = json.load(handle)
    assert 0 <= written["Rank-1"] <= 100 and written["Rank-1"] == float(results_a["Rank-1"])
    # SEED 0 in the YAML: the same run twice gives the same numbers, to the last digit
    assert {k: float(v) for k, v in results_a.items()} == {k: float(v) for k, v in
                                                           results_b.items()}
