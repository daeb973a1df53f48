"""Importing from the repository root, where the folder kernels/ (lasp_hf.kernels) sits on sys.path under the
top-level name `kernels`, which belongs to Hugging Face's kernels package (a transformers dependency)."""

import importlib.metadata
import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

# Prepended to PROBE to run it as if Hugging Face's kernels were not installed (as on a machine where transformers
# does not require it): the import system sees only the root's kernels/ folder under that name, and the package
# metadata has no distribution named kernels.
HIDE_HF_KERNELS = """
import importlib.machinery, importlib.metadata, os
_root = os.getcwd()
_find_spec = importlib.machinery.PathFinder.find_spec.__func__
def _find_spec_without_hf_kernels(cls, name, path=None, target=None):
    if name == "kernels":
        path = [entry for entry in (path or [_root]) if os.path.abspath(entry or os.curdir) == _root]
    return _find_spec(cls, name, path, target)
importlib.machinery.PathFinder.find_spec = classmethod(_find_spec_without_hf_kernels)
for _name in ("version", "distribution", "metadata"):
    def _hidden(name, _original=getattr(importlib.metadata, _name)):
        if name == "kernels":
            raise importlib.metadata.PackageNotFoundError(name)
        return _original(name)
    setattr(importlib.metadata, _name, _hidden)
"""

PROBE = """
import json, sys
import transformers.modeling_utils  # imports Hugging Face's `kernels` when that package is installed
import lasp_hf
from transformers.utils.import_utils import is_kernels_available
import kernels
try:
    from kernels import get_kernel
    error = None
except ImportError as exc:
    error = str(exc)
print(json.dumps({"lasp_hf.kernels": lasp_hf.kernels.__file__, "kernels": kernels.__file__, "error": error,
                  "kernels_available": is_kernels_available(),
                  "root_on_path": sys.path[0] == ""}))  # python -c puts the working directory first
"""


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _probe(prelude=""):
    result = subprocess.run(
        [sys.executable, "-c", prelude + PROBE], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["root_on_path"], "the probe must run with the repository root on sys.path"
    assert pathlib.Path(found["lasp_hf.kernels"]).resolve() == REPO / "kernels" / "__init__.py"
    return found


def _check_stand_in(found):
    """Without Hugging Face's kernels, `import kernels` gives the root's folder as an empty module: transformers
    (5.17 and 5.25 probe it the same way) finds no version and treats the package as absent, and taking a name
    from it fails with an ImportError that names the folder."""
    assert pathlib.Path(found["kernels"]).resolve() == REPO / "kernels" / "__init__.py"
    assert found["kernels_available"] is False
    assert "get_kernel" in found["error"] and str(REPO / "kernels") in found["error"], found["error"]


def test_imports_from_the_repository_root():
    found = _probe()
    if _hf_kernels_installed():
        assert found["error"] is None, found["error"]
        assert pathlib.Path(found["kernels"]).resolve() != REPO / "kernels" / "__init__.py"
    else:
        _check_stand_in(found)


def test_imports_from_the_repository_root_without_hf_kernels():
    """transformers 5.17 without Hugging Face's kernels (the GPU machine) imported the root's folder and failed
    on the ImportError it used to raise; now transformers, its modeling code and lasp_hf import."""
    _check_stand_in(_probe(HIDE_HF_KERNELS))


def test_script_folders_shadow_no_installed_module():
    """A script's folder comes first on sys.path, so a file there named like an installed module (as
    benchmarks/kernels.py was, once transformers began importing Hugging Face's `kernels`) replaces that module
    for every import in the process and in the workers it spawns."""
    installed = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    clashes = [
        str(path.relative_to(REPO))
        for folder in ("benchmarks", "recipes", "tests", "notebooks")
        for path in sorted((REPO / folder).glob("*.py"))
        if path.stem in installed
    ]
    assert not clashes, f"files named like installed modules: {clashes}"


DEEPSPEED_PROBE = """
import sys, tempfile
from lasp_hf import LaspConfig, LaspForCausalLM
model = LaspForCausalLM(LaspConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64))
with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
    LaspForCausalLM.from_pretrained(folder)
print("deepspeed" in sys.modules)
"""


def test_save_pretrained_does_not_import_deepspeed():
    """Importing deepspeed logs "Setting accelerator to CPU" in every process; without a DeepSpeed config nothing
    should import it (accelerate's unwrap did, for save_pretrained, when deepspeed is installed)."""
    result = subprocess.run(
        [sys.executable, "-c", DEEPSPEED_PROBE], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "False"
    assert "Setting accelerator" not in result.stderr


TOKENIZER_PROBE = """
import sys
{imports}
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1]{kwargs})
print(type(tokenizer).__name__, tokenizer("a b").input_ids)
"""


def _saved_model_and_tokenizer(folder):
    from lasp_hf import LaspConfig, LaspForCausalLM
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, "a": 2, "b": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
    config = LaspConfig(vocab_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=32)
    LaspForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_auto_tokenizer_of_a_saved_model_loads_without_a_prompt(tmp_path):
    """A saved model's config.json names remote code (auto_map), and AutoTokenizer reads config.json first: in a
    process that imported lasp_hf (which registers model_type "lasp"), or with trust_remote_code=True, it loads
    with no remote-code prompt and no warning. (Without either, transformers asks y/N for 15 s: a config.json
    whose auto_map lets trust_remote_code load the model always does.)"""
    _saved_model_and_tokenizer(tmp_path)
    for imports, kwargs in (("import lasp_hf", ""), ("", ", trust_remote_code=True")):
        probe = TOKENIZER_PROBE.format(imports=imports, kwargs=kwargs)
        result = subprocess.run(
            [sys.executable, "-c", probe, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
            timeout=120, stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.strip().splitlines()[-1].endswith("[2, 3]"), result.stdout
        for unwanted in ("custom code", "[y/N]", "model of type"):
            assert unwanted not in result.stdout + result.stderr, (imports, kwargs, result.stderr[-2000:])
