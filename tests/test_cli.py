"""The `moekit` command: parsing, extensibility, config errors, and a tiny end-to-end run."""
import json
import sys
import types
from pathlib import Path

import pytest

from moekit import cli

DATA = Path(__file__).parent / "data" / "shakespeare"


def test_commands_registered():
    assert cli._COMMAND_MODULES == ["moekit.cli.train", "moekit.cli.recipes"]
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"train", "compare", "report", "generate", "presets"} <= set(sub.choices)
    args = parser.parse_args(["train", "--preset", "tiny", "--set", "train.steps=3", "--set", "model.top_k=2"])
    assert args.preset == "tiny" and args.overrides == ["train.steps=3", "model.top_k=2"]


def test_data_flag_points_at_user_files():
    from moekit.cli.train import resolve_config

    args = cli.build_parser().parse_args(["train", "--data", str(DATA), "extra/*.txt"])
    assert args.data == [str(DATA), "extra/*.txt"]
    run = resolve_config(None, None, ["data.source=files", "data.paths=" + json.dumps(args.data)])
    assert run.data.source == "files" and run.data.paths == (str(DATA), "extra/*.txt")


def test_a_missing_command_module_contributes_nothing(monkeypatch):
    monkeypatch.setattr(cli, "_COMMAND_MODULES", ["moekit.cli.train", "moekit.no_such_module.commands"])
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "train" in sub.choices


def test_an_extra_command_module_registers(monkeypatch):
    mod = types.ModuleType("moekit_fake_cmds")

    def register(sp):
        p = sp.add_parser("hello")
        p.set_defaults(func=lambda args: 7)

    mod.register = register
    monkeypatch.setitem(sys.modules, "moekit_fake_cmds", mod)
    monkeypatch.setattr(cli, "_COMMAND_MODULES", ["moekit_fake_cmds"])
    assert cli.main(["hello"]) == 7


@pytest.mark.parametrize("argv,match", [
    (["train", "--set", "train.stepz=1"], "valid keys"),
    (["train", "--preset", "nope"], "available: "),
    (["train", "--set", "model.router=nope"], "router must be one of"),
])
def test_bad_config_fails_at_once(argv, match, capsys, tmp_path):
    assert cli.main(argv + ["--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert match in err
    assert not (tmp_path / "x").exists()        # failed before doing any work


def test_toml_config_errors(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = 3\nwarmup = 2\n")
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert "unknown key(s) ['warmup'] in [train]" in capsys.readouterr().err


def test_end_to_end_train_compare_report_generate(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
name = "e2e"
[model]
d_model = 32
n_layers = 2
n_heads = 2
num_experts = 4
[data]
source = "files"
paths = ["{DATA}"]
tokenizer = "char"
seq_len = 32
batch_size = 4
val_fraction = 0.25
[train]
steps = 6
eval_every = 3
eval_batches = 1
log_every = 3
ckpt_every = 3
""")
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(cfg), "--out", str(out), "--quiet", "--no-report"]) == 0
    text = capsys.readouterr().out
    assert "Equal steps (step 6)" in text and "Equal wall time" in text and "dense" in text
    # running into the same folder again refuses; --resume of a finished run is a no-op
    assert cli.main(["train", "--config", str(cfg), "--out", str(out), "--quiet"]) == 2
    assert cli.main(["train", "--resume", str(out), "--quiet", "--no-report"]) == 0
    # --auto-resume (what torchrun --max-restarts re-runs): continues the run with the same
    # config, refuses a different one
    assert cli.main(["train", "--config", str(cfg), "--out", str(out), "--quiet", "--no-report",
                     "--auto-resume"]) == 0
    assert "resumes where it holds checkpoints" in capsys.readouterr().out
    assert cli.main(["train", "--config", str(cfg), "--out", str(out), "--quiet", "--no-report",
                     "--auto-resume", "--set", "train.seed=5"]) == 2
    assert cli.main(["train", "--auto-resume", "--quiet"]) == 2          # needs --out
    assert "--auto-resume needs --out" in capsys.readouterr().err
    assert cli.main(["compare", str(out), "--json"]) == 0
    comp = json.loads(capsys.readouterr().out)
    assert [r["variant"] for r in comp["equal_steps"]["rows"]] == ["moe", "dense"]
    assert cli.main(["report", str(out)]) == 0
    capsys.readouterr()
    assert (out / "summary.json").exists() and (out / "report.html").exists()
    assert cli.main(["generate", str(out / "moe"), "--prompt", "HAMLET", "--max-new-tokens", "20"]) == 0
    gen = capsys.readouterr().out
    assert gen.startswith("HAMLET") and len(gen.rstrip("\n")) == 26
    # Experts offloaded to the host with 1 cached per layer: the same text, and cache statistics.
    assert cli.main(["generate", str(out / "moe"), "--prompt", "HAMLET", "--max-new-tokens", "20",
                     "--offload-cache", "1", "--prefetch"]) == 0
    captured = capsys.readouterr()
    assert captured.out == gen
    assert "1 cached per layer" in captured.err and "hit rate" in captured.err
    assert cli.main(["generate", str(out / "moe"), "--prefetch"]) == 2
    assert "--prefetch needs --offload-cache S" in capsys.readouterr().err
    assert cli.main(["generate", str(out / "moe"), "--offload-cache", "0"]) == 2
    assert "--offload-cache must be a positive int or None, got 0" in capsys.readouterr().err
    assert cli.main(["generate", str(tmp_path / "nothing")]) == 2


def test_presets_name_the_default_multi_domain_run(capsys):
    assert cli.main(["presets"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "shakespeare+sotu+python (bpe)" in lines["default"]
    assert "shakespeare (char)" in lines["shakespeare-char"]


def test_multi_domain_run_from_the_command_line(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    data = DATA.parent
    domains = json.dumps([str(data / "shakespeare"), str(data / "sotu"), str(data / "python" / "*.py")])
    out = tmp_path / "run"
    sets = [f"data.domains={domains}", "data.vocab_size=300", "data.seq_len=16", "data.batch_size=3",
            "data.val_fraction=0.25", f"data.cache_dir={tmp_path / 'cache'}", "model.d_model=32", "model.n_layers=1",
            "train.steps=4", "train.eval_every=2", "train.eval_batches=1", "train.ckpt_every=4"]
    argv = ["train", "--out", str(out), "--quiet"] + [a for s in sets for a in ("--set", s)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "data: domains, 8 train / 4 val documents" in text
    table = text.split("Validation loss per domain, equal steps (step 4):\n")[1].splitlines()
    assert table[0].split() == ["variant", "shakespeare", "sotu", "python"]
    assert [row.split()[0] for row in table[2:4]] == ["moe", "dense"]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["variants"]["moe"]["val_loss_by_domain"]) == {"shakespeare", "sotu", "python"}
    assert cli.main(["generate", str(out / "moe"), "--prompt", "import ", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("import ")
