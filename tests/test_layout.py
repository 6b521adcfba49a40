"""The layout's rules (scripts/import_graph.py): imports go one way, down the layers, and nothing imports a
command (scripts/, experiments/)."""
from conftest import load_script, run_script

import_graph = load_script("import_graph")


def test_the_project_keeps_its_import_rules():
    proc = run_script("scripts/import_graph.py")
    assert "no circle" in proc.stdout and "VIOLATION" not in proc.stdout
    edges = import_graph.graph()
    assert ("distil/losses", "import") not in edges["utils"]  # a sample edge the wrong way round
    assert ("distil/losses", "import") in edges["distiller"]
    assert ("tasks/training", "import") in edges["run_glue_w_distillation"]
    assert ("distil/distributed/sharding", "import") in edges["train"]


def test_the_root_keeps_the_originals_files_and_entry_points_only():
    """The library lives in packages: a new module at the root is a layout decision, made here on purpose."""
    import os

    from conftest import REPO

    root = sorted(name[:-3] for name in os.listdir(REPO) if name.endswith(".py"))
    assert root == sorted(import_graph.BASE + import_graph.ENTRY_POINTS + ("distiller",)), root


def test_the_check_sees_a_circle_and_a_script_import(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("from c import x\n")
    (tmp_path / "c.py").write_text("import a\nimport demo\n")
    (tmp_path / "scripts" / "demo.py").write_text("import a\n")
    broken = import_graph.violations(import_graph.graph(str(tmp_path)))
    assert any(v.startswith("import circle:") and "a -> b -> c -> a" in v for v in broken), broken
    assert any("imports the script scripts/demo" in v for v in broken), broken
    assert import_graph.main(str(tmp_path)) == 1


def test_the_check_sees_an_import_up_the_layers(tmp_path):
    """The library importing a task module, a task module importing an entry point: both point up."""
    for package in ("distil", "tasks"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "utils.py").write_text("")
    (tmp_path / "train.py").write_text("from distil import losses\n")
    (tmp_path / "distil" / "losses.py").write_text("import utils\nfrom tasks.glue import x\n")
    (tmp_path / "tasks" / "glue.py").write_text("from train import main\nfrom distil import losses\n")
    broken = import_graph.violations(import_graph.graph(str(tmp_path)))
    ups = sorted(v for v in broken if "points up" in v)
    assert len(ups) == 2 and ups[0].startswith("distil/losses (library (distil)) imports tasks/glue"), broken
    assert ups[1].startswith("tasks/glue (tasks/bench/demo) imports train (entry points)"), broken


def test_distillation_config_defaults_are_train_py_defaults():
    """The loop's configuration keeps train.py's defaults (the benchmark and the tests build it directly)."""
    import dataclasses

    import train
    from distiller import DistillationConfig

    args = train.parse_args(["--dump_path", "d", "--data_file", "f", "--student_type", "distilbert",
                             "--student_config", "c"])
    from_flags = DistillationConfig.from_args(args, max_model_input_size=512)
    direct = DistillationConfig(dump_path="d", mlm=False)
    for field in dataclasses.fields(DistillationConfig):
        assert getattr(from_flags, field.name) == getattr(direct, field.name), field.name


def test_torch_floor_is_the_tested_version():
    """requirements.txt's torch floor is the version CI installs and the tests run on."""
    import re

    from conftest import REPO

    ci = open(f"{REPO}/.ci/run").read()
    pinned = re.search(r"torch==([0-9.]+)", ci).group(1)
    floors = re.findall(r"^torch>=([0-9.]+)", open(f"{REPO}/requirements.txt").read(), re.M)
    assert floors == [pinned]


def test_ddp_runs_do_not_import_fsdp():
    """train.py and the loop import torch.distributed.fsdp only when a run shards (--fsdp): a DDP or
    single-process run works on a torch without it."""
    code = ("import sys; sys.modules['torch.distributed.fsdp'] = None; "
            "import train, distiller; from distil import evaluation, checkpointing; "
            "from distil.distributed import sharding; from tasks import training; print('imported')")
    assert "imported" in run_script("-c", code).stdout
