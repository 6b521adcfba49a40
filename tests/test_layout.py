"""The layout's rules (scripts/import_graph.py): imports go one way, nothing imports a script."""
from conftest import load_script, run_script

import_graph = load_script("import_graph")


def test_the_project_keeps_its_import_rules():
    proc = run_script("scripts/import_graph.py")
    assert "no circle" in proc.stdout and "VIOLATION" not in proc.stdout
    edges = import_graph.graph()
    assert ("losses", "import") not in [(t, h) for t, h in edges["utils"]]  # a sample edge the wrong way round
    assert ("losses", "import") in edges["distiller"]


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
            "import train, distiller, evaluation, checkpointing, sharding, task_training; print('imported')")
    assert "imported" in run_script("-c", code).stdout
