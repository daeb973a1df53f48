"""The README stays true: its runnable Python example runs, its Quickstart is two commands, and CI runs its test
command."""

import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def code_blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def quickstart_commands():
    quickstart = re.split(r"^## [^\n]*[Qq]uickstart", README, maxsplit=1, flags=re.MULTILINE)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", quickstart, flags=re.DOTALL)[0]  # the first: the two quickstart commands
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_quickstart_is_two_commands_and_ci_runs_the_test_one():
    commands = quickstart_commands()
    assert commands == ["bash recipes/demo.sh", "bash tests/run.sh"]
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == commands[1]
    for command in commands:
        assert (REPO / command.split()[1]).is_file()


def test_model_example_runs(tmp_path):
    (example,) = [block for block in code_blocks("python") if block.startswith("import lasp_hf")]
    example = example.replace("/tmp/tnl-tiny", str(tmp_path / "tnl-tiny"))
    result = subprocess.run([sys.executable, "-c", example], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    # The example prints one sample that starts with its prompt. (With DeepSpeed installed, transformers imports it,
    # and DeepSpeed logs its accelerator choice to stdout first.)
    assert any(line.startswith("Return the") for line in result.stdout.splitlines()), result.stdout[-2000:]


def test_presets_named_in_the_readme_exist():
    presets = README.split("Presets in `recipes/configs/`:", 1)[1].split("`LaspConfig.token_mixer`", 1)[0]
    names = re.findall(r"`([\w-]+\.json)`", presets)
    # Every shipped preset is named, and every named one exists.
    assert sorted(names) == sorted(path.name for path in (REPO / "recipes" / "configs").glob("*.json")), names
