"""``lightning_idrs.certify`` (the Python API) and the command's parser: rows that depend only on the seed
and the point, stacked --config files, --print_config, the default folder and the printed summary."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lightning_idrs
from lightning_idrs.commands.certify import main
from lightning_idrs.module import CHECKPOINT_KEY
from lightning_idrs.reporting import SUMMARY_NAME, read_summary
from lightning_idrs.tsv_log import SETTINGS_NAME, TSV_NAME, read_tsv
from tests.helpers import ROWS, SMALL

QUIET = dict(n0=10, n=200, wandb=lightning_idrs.certification.WandbOptions(mode="disabled"))


def rows_by_idx(result):
    return {int(i): tuple(result.rows[k][j] for k in ROWS) for j, i in enumerate(result.rows["idx"])}


@pytest.mark.slow
def test_rows_depend_only_on_the_seed_and_the_point(checkpoint, tmp_path):
    full = lightning_idrs.certify(checkpoint, tmp_path / "full", max=12, **QUIET)
    assert full.summary["num_points"] == 12 and (tmp_path / "full" / TSV_NAME).is_file()
    np.testing.assert_array_equal(full.rows["radius"], read_tsv(tmp_path / "full" / TSV_NAME)["radius"])
    assert read_summary(tmp_path / "full" / SUMMARY_NAME)["acr"] == full.summary["acr"]
    reference = rows_by_idx(full)
    # other skip, max, chunking and batch size: the shared points get the same rows
    other = lightning_idrs.certify(checkpoint, tmp_path / "other", skip=3, max=4, points_per_chunk=3, batch_size=70,
                                   **QUIET)
    assert sorted(rows_by_idx(other)) == [0, 3, 6, 9]
    assert all(reference[i] == row for i, row in rows_by_idx(other).items())
    # an interrupted run (max 5) extended to 12 in the same folder: the rows of a fresh max = 12 run
    lightning_idrs.certify(checkpoint, tmp_path / "grown", max=5, points_per_chunk=4, **QUIET)
    grown = lightning_idrs.certify(checkpoint, tmp_path / "grown", max=12, **QUIET)
    assert rows_by_idx(grown) == reference
    # the seed changes the noise; the same seed gives the same rows
    again = lightning_idrs.certify(checkpoint, tmp_path / "again", max=12, seed=0, **QUIET)
    seeded = lightning_idrs.certify(checkpoint, tmp_path / "seed1", max=12, seed=1, **QUIET)
    assert rows_by_idx(again) == reference
    p_a = {i: row[ROWS.index("p_a_lower")] for i, row in rows_by_idx(seeded).items()}
    assert sum(p_a[i] != reference[i][ROWS.index("p_a_lower")] for i in p_a) >= 6


def test_a_folder_of_the_old_noise_scheme_is_refused(checkpoint, tmp_path, capsys):
    out = tmp_path / "old"
    assert main(["--ckpt_path", str(checkpoint), *SMALL, "--certify.out", str(out), "--certify.max", "2"]) == 0
    settings = json.loads((out / SETTINGS_NAME).read_text())
    assert settings["noise"] == "point-philox-v3"
    (out / SETTINGS_NAME).write_text(json.dumps({**settings, "noise": "point-seeded-v2"}))  # the version before
    before = (out / TSV_NAME).read_bytes()
    assert main(["--ckpt_path", str(checkpoint), *SMALL, "--certify.out", str(out), "--certify.max", "4"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"error: {out} holds rows of the noise version 'point-seeded-v2'")
    assert "use another --certify.out" in err and (out / TSV_NAME).read_bytes() == before


def test_config_files_stack_key_by_key_and_flags_win(checkpoint, tmp_path, capsys):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("certify:\n  n: 150\n  max: 7\n  split: val\n")
    second.write_text("certify:\n  n0: 12\n  max: 4\nwandb:\n  mode: disabled\n")
    out = tmp_path / "run"
    args = ["--ckpt_path", str(checkpoint), "--config", str(first), "--config", str(second), "--certify.max", "3",
            "--certify.out", str(out)]
    assert main(args) == 0
    summary = read_summary(out / SUMMARY_NAME)
    assert (summary["n"], summary["n0"], summary["split"], summary["num_points"]) == (150, 12, "val", 3)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        from lightning_idrs.commands.certify import build_parser

        build_parser().parse_args(["--config", "digits", "--config", str(first), "--config", str(second),
                                   "--certify.radii", "0.1,0.3", "--print_config"])
    assert exit_.value.code == 0
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["certify"]["n"] == 150 and printed["certify"]["n0"] == 12 and printed["certify"]["max"] == 4
    assert printed["certify"]["radii"] == [0.1, 0.3] and printed["wandb"]["mode"] == "disabled"
    assert printed["data"]["class_path"] == "lightning_idrs.data.DigitsDataModule"  # from the packaged digits


def test_help_has_the_groups(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for group in ("checkpoint:", "distributed:", "Weights & Biases", "--certify.devices", "--print_config",
                  "--certify.seed", "--data.root"):
        assert group in text, group
    assert text.index("distributed:") < text.rindex("--certify.num_nodes") and text.count("distributed:") == 1


@pytest.mark.slow
def test_default_folder_is_one_per_checkpoint_and_off_grid_radii_are_printed(checkpoint, tmp_path, capsys,
                                                                             monkeypatch):
    from lightning_idrs.digests import state_dict_sha256

    other = tmp_path / "b" / Path(checkpoint).name  # the same file name, other weights
    other.parent.mkdir()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    next(v for v in state["state_dict"].values() if torch.is_tensor(v) and v.is_floating_point()).view(-1)[0] += 0.5
    state[CHECKPOINT_KEY]["weights_sha256"] = state_dict_sha256(state["state_dict"])
    torch.save(state, other)
    monkeypatch.chdir(tmp_path)
    for path in (checkpoint, other):
        assert main(["--ckpt_path", str(path), *SMALL, "--certify.max", "2", "--certify.radii", "0.1,0.3"]) == 0
        assert "certified accuracy: R=0.1: " in capsys.readouterr().out
    folders = sorted(p.name for p in (tmp_path / "certify").iterdir())
    assert len(folders) == 2 and all(name.startswith(Path(checkpoint).stem + "-") for name in folders)
