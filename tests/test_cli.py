"""The command line as a new user meets it: README's commands work as written (with local files), bad input
gets a clear message before any work and leaves nothing behind, progress is readable in a log, --help explains."""

import json
import os
import re
import shlex
from pathlib import Path

import open_clip
import pytest
import torch

from lorekit.__main__ import main
from lorekit.pretrain import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]
# Budgets that make any train/eval command take seconds: README's commands are run with these appended.
TINY = {"train": ["--steps", "1", "--batch-size", "4", "--attack-steps", "1", "--eval-samples", "8"],
        "eval": ["--samples", "8", "--steps", "1"]}


def readme_command_line() -> tuple[list[list[str]], list[list[str]]]:
    """README's "Command line" section: the `python -m lorekit` commands of its code block (arguments after
    `lorekit`, comments dropped), and the flag sets of its "For real models" sentence."""
    section = (REPO / "README.md").read_text().split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line.split(" #", 1)[0])[3:] for line in block.splitlines()
                if line.startswith("python -m lorekit ")]
    real = section.split("For real models:", 1)[1].split(";", 1)[0]  # up to "; data sets by ..."
    return commands, [shlex.split(flags) for flags in re.findall(r"`(--[^`]+)`", real)]


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_readme_commands_run_as_written(tmp_path, monkeypatch, capsys, one_thread):
    """Each command of the code block, in order, with tiny budgets; `...` repeats the flags of the train
    command that wrote the same run directory; the sweep stops once validated (its points are not run)."""
    import lorekit.sweep

    commands, _ = readme_command_line()
    assert len(commands) >= 5 and {c[0] for c in commands} >= {"train", "eval", "sweep"}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notebooks").symlink_to(REPO / "notebooks")
    queued = []
    monkeypatch.setattr(lorekit.sweep, "_run_in_pool", lambda points, *rest: queued.extend(points))
    written: dict[str, list[str]] = {}
    for args in commands:
        if "..." in args:
            args = [a for a in args if a != "..."] + written[_flag(args, "--run-dir")][1:]
        if "--help" in args:
            with pytest.raises(SystemExit) as done:
                main(args)
            assert done.value.code == 0 and "--rho" in capsys.readouterr().out
            continue
        assert main(args + TINY.get(args[0], [])) == 0, (args, capsys.readouterr().err)
        if args[0] == "train" and _flag(args, "--run-dir"):
            written.setdefault(_flag(args, "--run-dir"), args)
    assert (tmp_path / "runs" / "lore" / "summary.json").is_file()
    grid = [_flag(c, "--grid") for c in commands if c[0] == "sweep"]
    assert len(queued) == sum(len(g.split("=", 1)[1].split(",")) for g in grid)


@pytest.fixture
def openai_vit_b_32_as_tiny(monkeypatch, tiny_hub_repo):
    """ViT-B-32 (QuickGELU) shrunk to lorekit-tiny's size, its 'openai' weights in the local hub cache: the
    model name, tag, cache lookup and loading path are the real ones; only the architecture is small."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "ViT-B-32-quickgelu",
                        {**open_clip.get_model_config(TINY_MODEL), "quick_gelu": True})
    source = open_clip.get_pretrained_cfg("ViT-B-32-quickgelu", "openai")["hf_hub"]
    tiny_hub_repo(source.rstrip("/"), config=False)


@pytest.mark.parametrize("flags", readme_command_line()[1], ids=" ".join)
def test_readme_real_model_flags_load_from_local_files(flags, tmp_path, monkeypatch, capsys, tiny_hub_repo,
                                                       openai_vit_b_32_as_tiny, one_thread):
    """`--model ViT-B-32 --pretrained openai`, `--model hf-hub:...` (without --pretrained '') and
    `--pretrained path/to/checkpoint.pt`, each from files this test puts where README says they go."""
    monkeypatch.chdir(tmp_path)
    model = _flag(flags, "--model") or ""
    if model.startswith("hf-hub:"):
        tiny_hub_repo(model.removeprefix("hf-hub:"))
    checkpoint = _flag(flags, "--pretrained")
    if checkpoint and checkpoint.endswith(".pt"):
        Path(checkpoint).parent.mkdir(parents=True)
        torch.save(open_clip.create_model(TINY_MODEL).state_dict(), checkpoint)
    assert main(["train", *flags, *TINY["train"], "--run-dir", "run"]) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "encoder.pt").is_file()


# ------------------------------------------------------------------------------------ bad input
def _refused(capsys, argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"lorekit {argv[0]}: error: " in err and needle in err, err
    assert "Traceback" not in err


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if open_clip builds a model: every error below must come before that."""
    def refuse(*args, **kwargs):
        pytest.fail("a model was loaded before the input was checked")

    monkeypatch.setattr(open_clip, "create_model", refuse)


@pytest.mark.parametrize("argv,needle", [
    (["eval", "--device", "gpu"], "device='gpu': must be one of auto, cpu, cuda"),
    (["eval", "--eps", "0"], "eps=[0.0]: every ε must lie in (0, 255]"),
    (["eval", "--dataset", "no/such/folder"], "dataset='no/such/folder': not a known data set name"),
    (["eval", "--pretrained", "missing.pt"], "pretrained='missing.pt': checkpoint file not found"),
    (["robust-eval", "--device", "gpu"], "device='gpu'"),
    (["robust-eval", "--eps", "300"], "eps=300/255: every ε must lie in (0, 1]"),
    (["robust-eval", "--image-encoder", "missing.pt"], "image_encoder='missing.pt': file not found"),
    (["train", "--pretrained", "."], "pretrained='.': is a folder"),
])
def test_bad_flags_are_refused_before_the_model_loads(argv, needle, tmp_path, monkeypatch, capsys, no_model_load):
    monkeypatch.chdir(tmp_path)
    _refused(capsys, argv, needle)
    assert not any(tmp_path.iterdir())


def test_eval_on_a_machine_without_cuda_says_so(tmp_path, monkeypatch, capsys, no_model_load):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _refused(capsys, ["eval", "--device", "cuda"], "device='cuda': no CUDA device is visible; use 'auto' or 'cpu'")


def _fake_run(run: Path, finished: bool, **fields) -> Path:
    from lorekit.config import TrainConfig

    run.mkdir()
    (run / "config.json").write_text(json.dumps({**TrainConfig().to_dict(), **fields}))
    if finished:
        (run / "summary.json").write_text("{}")
    return run


def test_eval_of_a_run_is_checked_before_loading(tmp_path, monkeypatch, capsys, no_model_load):
    monkeypatch.chdir(tmp_path)
    _refused(capsys, ["eval", "--run", "nothing-here"], "run='nothing-here': not a run directory (no config.json)")
    _fake_run(tmp_path / "half", finished=False)
    _refused(capsys, ["eval", "--run", "half"], "run='half': not a finished run (no summary.json)")
    _fake_run(tmp_path / "done", finished=True)
    _refused(capsys, ["eval", "--run", "done", "--model", "ViT-B-32"], "leave out --model")


def test_a_run_trained_on_a_gpu_is_evaluated_on_the_cpu(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--method", "fare", *TINY["train"], "--run-dir", "run", "--quiet"]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps({**config, "device": "cuda"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["eval", "--run", "run", "--device", "cpu", *TINY["eval"], "--eps", "4", "--quiet"]) == 0
    assert "clean_acc" in capsys.readouterr().out


@pytest.mark.parametrize("argv,field", [
    (["train", "--run-dir", "{file}"], "run_dir"),
    (["train", "--run-dir", "{file}/sub"], "run_dir"),
    (["demo", "--out", "{file}", "--steps", "1"], "out"),
    (["robust-eval", "--out-dir", "{file}"], "out_dir"),
])
def test_an_output_folder_that_is_a_file_is_refused_before_loading(argv, field, tmp_path, monkeypatch, capsys,
                                                                     no_model_load):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("a file, not a folder")
    argv = [a.format(file="taken") for a in argv]
    _refused(capsys, argv, f"{field}='{argv[argv.index('--' + field.replace('_', '-')) + 1]}'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders, so there is nothing to refuse")
def test_a_read_only_run_folder_is_refused_before_loading(tmp_path, monkeypatch, capsys, no_model_load):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    monkeypatch.chdir(tmp_path)
    _refused(capsys, ["train", "--run-dir", "locked/run"], "cannot write to")


def test_an_unwritable_output_folder_is_refused_even_for_root(tmp_path, monkeypatch, capsys, no_model_load):
    """The same check with the permission answer faked for one folder, so it also runs where tests run as root."""
    locked, access = tmp_path / "locked", os.access
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).resolve() != locked and access(path, mode))
    monkeypatch.chdir(tmp_path)
    _refused(capsys, ["train", "--run-dir", "locked/run"], f"run_dir='locked/run': cannot write to '{locked}'")
    _refused(capsys, ["demo", "--out", "locked", "--steps", "1"], f"out='locked': cannot write to '{locked}'")


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_demo_refuses_zero_steps_and_writes_nothing(steps, tmp_path, monkeypatch, capsys, no_model_load):
    monkeypatch.chdir(tmp_path)
    _refused(capsys, ["demo", "--steps", steps, "--out", "demo"], f"steps={steps}: must be an integer >= 1")
    assert not any(tmp_path.iterdir())


def test_a_sweep_names_a_file_that_is_not_a_notebook_and_an_out_root_that_is_a_file(tmp_path, capsys):
    (tmp_path / "notes.ipynb").write_text("this is not JSON {")
    (tmp_path / "other.ipynb").write_text('{"hello": 1}')
    for name in ("notes.ipynb", "other.ipynb"):
        _refused(capsys, ["sweep", str(tmp_path / name), "--name", "x", "--out-root", str(tmp_path / "out")],
                 f"notebook {tmp_path / name}: cannot read it as a Jupyter notebook")
    assert not (tmp_path / "out").exists()
    (tmp_path / "taken").write_text("a file, not a folder")
    _refused(capsys, ["sweep", str(REPO / "tests" / "fixtures" / "sweep_toy.ipynb"), "--name", "x", "--out-root",
                      str(tmp_path / "taken")], f"out_root '{tmp_path / 'taken'}': cannot create the sweep's folder")


# ------------------------------------------------------------------------------------ progress and help
@pytest.mark.parametrize("verb", ["train", "eval", "robust-eval", "demo", "sweep"])
def test_every_verb_explains_itself_and_its_defaults(verb, capsys):
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]
    assert len(description.split()) >= 10, description
    assert " ".join(out.split()).count("(default: ") >= 2
    assert verb == "sweep" or "--quiet" in out


def test_progress_in_a_log_is_one_readable_line_every_few_seconds(tmp_path, monkeypatch, capsys, one_thread):
    """stderr is not a terminal here, as in a log: plain lines, no carriage returns; --quiet silences them."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--method", "fare", *TINY["train"], "--steps", "3", "--run-dir", "run"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.search(r"^fare: step 0/3 \(0%\)$", err, re.M), err
    assert re.search(r"^fare: done, step 3/3 in \d+s, loss \S+, viol \S+$", err, re.M), err
    assert re.search(r"^fare evaluation: done, batch 2/2 in \d+s$", err, re.M), err
    assert main(["eval", "--run", "run", *TINY["eval"], "--eps", "4"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and re.search(r"^evaluation: done, batch 2/2 in \d+s$", err, re.M), err
    assert main(["eval", "--run", "run", *TINY["eval"], "--eps", "4", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_robust_eval_progress_is_plain_lines(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    assert main(["robust-eval", "--n-samples", "8", "--chunk-size", "4", "--eps", "4", "--n-iter", "2",
                 "--n-target-classes", "2", "--sanity-samples", "4", "--sanity-iter", "2", "--out-dir", "re"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.search(r"^APGD-CE\+APGD-T: done, chunk 2/2 in \d+s, at ε=4/255 chunk 2/2$", err, re.M), err
    assert re.search(r"^sanity checks: done, check 4/4 in \d+s$", err, re.M), err


def test_pretraining_reports_progress(capsys, one_thread):
    from lorekit.pretrain import SETTINGS, pretrain_tiny

    pretrain_tiny({**SETTINGS, "steps": 2, "batch_size": 8}, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and re.search(r"^pretraining lorekit-tiny on the suite: done, step 2/2 in \d+s, loss \S+$",
                                         err, re.M), err
